"""The error every step of the QNN lowering raises, naming the node, its op and its lowbit layer."""

from __future__ import annotations

__all__ = ["LoweringError"]


class LoweringError(ValueError):
    """The model cannot be lowered for the QNN HTP; the message says where and what to do."""

    def __init__(self, node: str, op: str, layer: str, problem: str, remedy: str):
        self.node, self.op, self.layer = node, op, layer
        super().__init__(f"node '{node}' (op {op}, lowbit layer '{layer}'): {problem}. {remedy}")
