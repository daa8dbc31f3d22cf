"""Fresh tensor and node names for graph rewrites (export/precision.py, export/cpu_rewrites.py)."""


class FreshNames:
    """Fresh tensor names that collide with nothing in the graph or handed out before."""

    def __init__(self, graph):
        self.taken = {value for node in graph.node for value in list(node.input) + list(node.output)}
        self.taken |= {init.name for init in graph.initializer} | {node.name for node in graph.node}

    def fresh(self, base: str) -> str:
        candidate, index = base, 0
        while candidate in self.taken:
            index += 1
            candidate = f"{base}_{index}"
        self.taken.add(candidate)
        return candidate
