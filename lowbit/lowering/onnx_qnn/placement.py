"""Where each node of a QDQ model runs: HTP, CPU fallback, or an HTP float island.

Two checks, both at compile time. (1) onnxruntime's record of which execution provider got each
node (``session.record_ep_graph_assignment_info``), in a session that allows CPU fallback: a node
left to the CPU would stop a phone build. (2) The QNN graph the EP built (``dump_json_qnn_graph``):
an op with a float input or output runs in fp16 on the HTP instead of on lowbit's integer grids
(measured: such islands made a reference-model call 10x slower and its output 58% wrong). Each
finding names the ONNX node, its op, the fx node and the lowbit layer it was translated from.
"""

from __future__ import annotations

import glob
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx

from lowbit.lowering.onnx_qnn.htp import DEFAULT_SOC, EP_NAME, htp_session
from lowbit.lowering.onnx_qnn.onnx_graph import provenance

__all__ = ["Misplaced", "cpu_nodes", "dump_options", "float_islands"]

_QNN_FLOAT_CLASS = 0x02  # QNN data types 0x02xx are float16 / float32


@dataclass(frozen=True)
class Misplaced:
    node: str
    op: str
    fx_node: str
    layer: str
    where: str  # "cpu" or "htp-float"

    def message(self) -> str:
        what = "falls back to the CPU" if self.where == "cpu" else "runs in float on the HTP (off lowbit's integer grids)"
        return (f"ONNX node '{self.node}' (op {self.op}, from fx node '{self.fx_node}', lowbit layer '{self.layer}') {what}. "
                f"Keep that layer in a form the HTP takes (see lowbit/lowering/onnx_qnn), or report it")


class _Origins:
    """The fx node and lowbit layer of each ONNX node. A constant's DequantizeLinear, shared by
    every reader of equal constants, carries none of its own: it gets its first reader's."""

    def __init__(self, model: onnx.ModelProto):
        self.nodes = {n.name: n for n in model.graph.node}
        self.first_reader: dict[str, onnx.NodeProto] = {}
        for n in model.graph.node:
            for i in n.input:
                self.first_reader.setdefault(i, n)

    def misplaced(self, name: str, op: str, where: str) -> Misplaced:
        node = self.nodes.get(name)
        origin = provenance(node) if node is not None else {}
        if not origin and node is not None and node.output and node.output[0] in self.first_reader:
            origin = provenance(self.first_reader[node.output[0]])
        return Misplaced(name, op, origin.get("lowbit.fx_node", "?"), origin.get("lowbit.layer", "?"), where)


def cpu_nodes(model_path: str | Path, soc: str = DEFAULT_SOC) -> list[Misplaced]:
    """Nodes onnxruntime would run on the CPU beside ``soc``'s HTP (none for a QNN-ready model)."""
    origins = _Origins(onnx.load(str(model_path), load_external_data=False))
    session = htp_session(model_path, soc=soc, cpu_fallback=True, record_placement=True)
    found = []
    for subgraph in session.get_provider_graph_assignment_info():
        if subgraph.ep_name == EP_NAME:
            continue
        for n in subgraph.get_nodes():
            found.append(origins.misplaced(n.name, n.op_type, "cpu"))
    return found


def dump_options(folder: str | Path) -> dict[str, str]:
    """HTP session options that write the QNN graph the EP builds into ``folder`` (as JSON)."""
    return {"dump_json_qnn_graph": "1", "json_qnn_graph_dir": str(folder)}


def float_islands(model_path: str | Path, dump_folder: str | Path | None = None, soc: str = DEFAULT_SOC) -> list[Misplaced]:
    """HTP ops with a float tensor: Quantize/Dequantize excluded (they convert at the graph's edges).

    ``dump_folder``: where a session made with ``dump_options`` wrote its QNN graph (else one is made).
    """
    origins = _Origins(onnx.load(str(model_path), load_external_data=False))
    with tempfile.TemporaryDirectory() as tmp:
        if dump_folder is None:
            htp_session(model_path, soc=soc, extra_options=dump_options(tmp))
            dump_folder = tmp
        dumps = [f for f in glob.glob(f"{dump_folder}/*.json") if not f.endswith("_tensor_log.json")]
        graphs = [json.loads(Path(f).read_text())["graph"] for f in dumps]
    found = []
    for graph in graphs:
        tensors = graph["tensors"]
        for name, node in graph["nodes"].items():
            if node["type"] in ("Quantize", "Dequantize"):
                continue
            if any(t in tensors and tensors[t]["data_type"] >> 8 == _QNN_FLOAT_CLASS for t in node["input_names"] + node["output_names"]):
                found.append(origins.misplaced(name, node["type"], "htp-float"))
    return found
