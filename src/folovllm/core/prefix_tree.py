"""The prefix cache seen as a tree: the trie that the block-hash chain leaves implicit.

Each cached block names its parent's hash, so the cache already *is* a trie of
prefixes, stored flat as ``hash -> block``. Building the explicit tree (for the
chapter and for checks) only follows those parent links. Merging every run of
blocks that always go together (one child, same ref count) gives a radix tree,
the shape SGLang's RadixAttention keeps as its primary structure.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from folovllm.core.block_pool import BlockPool


@dataclass
class PrefixTreeNode:
    """A run of cached blocks: the tokens they hold, their ref count, what continues them."""

    block_ids: list[int]
    token_ids: list[int]
    ref_cnt: int  # running requests using the run (0: evictable; -1: the root)
    children: list["PrefixTreeNode"] = field(default_factory=list)

    @property
    def evictable(self) -> bool:
        return self.ref_cnt == 0

    def walk(self) -> list["PrefixTreeNode"]:
        """Every node below this one (itself excluded), depth first."""
        return [n for child in self.children for n in (child, *child.walk())]

    def render(self, decode: Callable[[list[int]], str] | None = None, width: int = 48) -> str:
        """An ASCII drawing: block ids, ref count, and the run's tokens (``decode`` turns them into text)."""
        lines = [f"(root) {sum(len(n.block_ids) for n in self.walk())} cached blocks"]

        def draw(node: PrefixTreeNode, indent: str) -> None:
            for i, child in enumerate(node.children):
                last = i == len(node.children) - 1
                ids = child.block_ids
                shown = ids if len(ids) <= 4 else [*ids[:3], "…", ids[-1]]
                span = f"block {ids[0]}" if len(ids) == 1 else f"blocks {','.join(map(str, shown))} ({len(ids)})"
                text = decode(child.token_ids) if decode else " ".join(map(str, child.token_ids))
                text = text.replace("\n", "\\n")
                text = text if len(text) <= width else text[: width - 3] + "..."
                state = "evictable" if child.evictable else f"ref {child.ref_cnt}"
                lines.append(f"{indent}{'└── ' if last else '├── '}{span}, {state}: {text!r}")
                draw(child, indent + ("    " if last else "│   "))

        draw(self, "")
        return "\n".join(lines)


def build_prefix_tree(pool: BlockPool, compress: bool = True) -> PrefixTreeNode:
    """The tree of every prefix in ``pool``'s cache; ``compress`` merges single-child runs (a radix tree).

    A block whose parent prefix is no longer cached (it was held by a block that
    filled later with the same prefix and was never named) hangs from the root.
    """
    cached = pool.cached_block_hash_to_block
    root = PrefixTreeNode([], [], -1)
    nodes = {h: PrefixTreeNode([b.block_id], list(b.token_ids), b.ref_cnt) for h, b in cached.items()}
    for h, block in sorted(cached.items(), key=lambda item: item[1].block_id):
        parent = nodes.get(block.parent_hash, root) if block.parent_hash is not None else root
        parent.children.append(nodes[h])
    if compress:
        _merge_runs(root)
    return root


def _merge_runs(node: PrefixTreeNode) -> None:
    for child in node.children:
        while len(child.children) == 1 and child.children[0].ref_cnt == child.ref_cnt:
            only = child.children[0]
            child.block_ids += only.block_ids
            child.token_ids += only.token_ids
            child.children = only.children
        _merge_runs(child)
