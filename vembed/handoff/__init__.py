"""Hand a store to the systems users search with at scale: Parquet (and Milvus bulk import), LanceDB,
Qdrant (``vembed store export``).

Every export streams the store shard by shard (:func:`~vembed.handoff.rows.iter_tables`: one shard's
rows in memory at a time) and then checks itself (:mod:`~vembed.handoff.check`): the exported
database's top-10 for sampled store vectors against vembed's exact search, over the same rows.
"""
