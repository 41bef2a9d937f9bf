from collections import Counter

import networkx as nx

from lowbit.ir.capture import capture
from lowbit.ir.graph_view import find_blocks, to_networkx
from lowbit.models.tiny import build


def test_unet_blocks(calib):
    gm = capture(build("sd-unet"), *calib("sd-unet")[0])
    blocks = find_blocks(gm)
    kinds = Counter(b.kind for b in blocks)
    # tiny SD UNet: 2+1+3+2 ResNet blocks, one BasicTransformerBlock per attention stack (4), attn1+attn2 each
    assert kinds == {"resnet": 8, "transformer": 4, "attention": 8}
    resnet = next(b for b in blocks if b.path == "down_blocks.0.resnets.0")
    assert resnet.layers == ("down_blocks.0.resnets.0.conv1", "down_blocks.0.resnets.0.time_emb_proj", "down_blocks.0.resnets.0.conv2")
    block = next(b for b in blocks if b.kind == "transformer")
    assert block.path.endswith("transformer_blocks.0") and any(p.endswith("ff.net.2") for p in block.layers)


def test_networkx_view_is_the_dataflow(calib):
    gm = capture(build("pixart"), *calib("pixart")[0])
    g = to_networkx(gm)
    assert nx.is_directed_acyclic_graph(g)
    assert g.number_of_nodes() == len(gm.graph.nodes)
    q = next(n for n, d in g.nodes(data=True) if d["layer"] == "transformer_blocks.0.attn2.to_q")
    # in the first block the image path has not met the text yet; the keys come from it
    assert "encoder_hidden_states" not in nx.ancestors(g, q)
    k = next(n for n, d in g.nodes(data=True) if d["layer"] == "transformer_blocks.0.attn2.to_k")
    assert "encoder_hidden_states" in nx.ancestors(g, k)
