import csv
import json

import lowbit
from lowbit.models.tiny import build
from lowbit.reports.layer_report import format_table, layer_report, write_csv, write_json


def test_report_rows_and_files(calib, tmp_path):
    samples = calib("pixart")
    rows = {}
    for recipe in ("minmax-w8a8", "minmax-w4a6"):
        qmodel = lowbit.quantize(build("pixart"), recipe, samples, progress=False)
        rows[recipe] = layer_report(qmodel, samples)
    r8 = {r.layer: r for r in rows["minmax-w8a8"]}
    r4 = {r.layer: r for r in rows["minmax-w4a6"]}
    q = r8["transformer_blocks.0.attn2.to_q"]
    assert (q.op, q.weight_bits, q.activation_bits, q.timesteps) == ("linear", 8, 8, 3)
    assert q.range_min < 0 < q.range_max and 0 < q.rel_error < 0.05
    assert r8["transformer_blocks.0.attn2"].op == "attention"
    # every quantized layer loses more at W4A6 than at W8A8; the io layers are listed, in float
    quantized = [k for k in r8 if r8[k].granularity != "float"]
    assert all(r4[k].rel_error > r8[k].rel_error for k in quantized)
    floats = {k: r8[k].set_by for k in r8 if k not in quantized}
    assert floats == {"pos_embed.proj": "keep_io_layers", "proj_out": "keep_io_layers"}
    table = format_table(rows["minmax-w8a8"])
    assert "transformer_blocks.0.attn2.to_q" in table and "SQNR dB" in table
    write_csv(rows["minmax-w8a8"], tmp_path / "r.csv")
    write_json(rows["minmax-w8a8"], tmp_path / "r.json")
    with open(tmp_path / "r.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows["minmax-w8a8"])
    assert json.loads((tmp_path / "r.json").read_text())[0]["layer"] == rows["minmax-w8a8"][0].layer
