"""Rewriting a store's records as an older format kept them."""

from __future__ import annotations

from dataclasses import replace

from cascowfs.catalog import Catalog
from cascowfs.metadb import MetaDB


def count_layers_by_chain(db: MetaDB, txn) -> None:
    """Layer refcounts as stores up to format 10 kept them: each layer counts the snapshot and
    branch chains naming it, and there are no chain nodes."""
    catalog = Catalog(db.dbs)
    chains = [rec.layers for _, rec in catalog.snapshots(txn)]
    chains += [rec.layers for _, rec in catalog.branches(txn)]
    for lid, rec in list(catalog.layers(txn)):
        catalog.put_layer(txn, lid, replace(rec, refs=sum(c.count(lid) for c in chains)))
    catalog.clear_chains(txn)
