"""Layer refcounts, kept per chain rather than per layer.

A chain is the list of layers a snapshot or a branch stacks, top first. Most chains are
shared: every branch of a snapshot stacks that snapshot's chain, and a commit stacks one new
layer on its parent's. So the store counts references to chains, in a tree of chain nodes:
the node of chain C (keyed by ``chain_key(C)``) is held once by each snapshot and branch
record that stacks exactly C, and once by the node of each chain one layer taller than C
that lies on it. A layer's refcount counts the nodes whose top it is, and a layer that no
node tops any more is dropped.

Holding a chain that already has a node then costs one read and one write, however deep the
chain (a branch, a discard, the prune of a snapshot whose children stack its chain). Only a
new node reaches down, to the first node that exists, and a freed node down to the first one
still held. Per-layer counts cost a read and a write per layer of the chain on every branch,
discard and prune, all in the committer's transactions (docs/architecture.md, *The committer
and the GIL*).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

import lmdb

from .catalog import Catalog
from .errors import StoreIOError


def chain_key(chain: Sequence[str]) -> bytes:
    """The key of ``chain``'s node: a digest, since a chain's ids may outgrow LMDB's keys."""
    return hashlib.blake2b("\0".join(chain).encode(), digest_size=16).digest()


def recount(chains: Iterable[Sequence[str]]) -> tuple[Counter[bytes], Counter[str]]:
    """The node and layer refcounts that records stacking ``chains`` (one per record) give,
    as ``LayerRefs.hold`` keeps them: fsck's comparison, and the upgrade that starts them."""
    nodes: Counter[bytes] = Counter()
    layers: Counter[str] = Counter()
    seen: set[bytes] = set()
    for chain in chains:
        for depth in range(len(chain)):
            key = chain_key(chain[depth:])
            nodes[key] += 1
            if key in seen:
                break
            seen.add(key)
            layers[chain[depth]] += 1
    return nodes, layers


class LayerRefs:
    """The chain nodes and the layer refcounts, changed inside the caller's write
    transaction; ``note_garbage`` runs in it when a dropped layer's tree may be garbage."""

    def __init__(self, catalog: Catalog, note_garbage: Callable[[lmdb.Transaction], None]):
        self._catalog = catalog
        self._note_garbage = note_garbage

    def hold(self, txn: lmdb.Transaction, chain: Sequence[str]) -> None:
        """One more record stacks ``chain``."""
        for depth in range(len(chain)):
            key = chain_key(chain[depth:])
            refs = self._catalog.chain_refs(txn, key)
            self._catalog.set_chain_refs(txn, key, refs + 1)
            if refs:
                return
            # a new node: its top layer gains a reference, and it holds the chain below
            self._count_layer(txn, chain[depth], +1)

    def release(self, txn: lmdb.Transaction, chain: Sequence[str]) -> list[str]:
        """One record less stacks ``chain``. Returns the layers no chain stacks any more
        (their records are gone; their directories or images can go)."""
        dropped = []
        for depth in range(len(chain)):
            key = chain_key(chain[depth:])
            refs = self._catalog.chain_refs(txn, key)
            if refs <= 0:
                raise StoreIOError(f"the chain {' '.join(chain[depth:])} is released but not held")
            self._catalog.set_chain_refs(txn, key, refs - 1)
            if refs > 1:
                break
            # the node is gone: its top layer loses a reference, and the chain below one
            if self._count_layer(txn, chain[depth], -1):
                dropped.append(chain[depth])
        return dropped

    def _count_layer(self, txn: lmdb.Transaction, lid: str, delta: int) -> bool:
        """Add ``delta`` to layer ``lid``'s refcount; True if that dropped the layer."""
        rec = self._catalog.find_layer(txn, lid)
        if rec is None:
            raise StoreIOError(f"layer {lid} is named by a chain but has no record")
        rec = replace(rec, refs=rec.refs + delta)
        if rec.refs > 0:
            self._catalog.put_layer(txn, lid, rec)
            return False
        self._catalog.delete_layer(txn, lid)
        self._note_garbage(txn)  # the layer held its tree
        return True

    def rebuild(self, txn: lmdb.Transaction) -> None:
        """Count every chain node and layer afresh from the snapshot and branch records (the
        upgrade from per-layer counts of chains)."""
        chains = [rec.layers for _, rec in self._catalog.snapshots(txn)]
        chains += [rec.layers for _, rec in self._catalog.branches(txn)]
        nodes, layers = recount(chains)
        self._catalog.clear_chains(txn)
        for key, refs in nodes.items():
            self._catalog.set_chain_refs(txn, key, refs)
        for lid, rec in list(self._catalog.layers(txn)):
            if rec.refs != layers[lid]:
                self._catalog.put_layer(txn, lid, replace(rec, refs=layers[lid]))
