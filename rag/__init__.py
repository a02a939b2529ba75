"""Document collections and retrieval for retrieval-augmented generation.

Entry points: :class:`rag.collections.CollectionManager` (everything the server and CLI call),
:class:`rag.passage.Passage` (a retrieved chunk) and :func:`rag.prompt.build_rag_messages`.
"""
