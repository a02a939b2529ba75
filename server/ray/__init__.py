"""Scale-out on Ray Serve: ``loraplex ray serve``.

Every engine replica hosts the whole app built by ``server/app.py`` (so every route behaves as under
``loraplex serve``); a thin ingress picks the Ray Serve multiplexed model id from each request's
adapter, so requests for one adapter keep landing on the replica that has it resident; one RAG
deployment owns the RAG collections, and every replica's RAG routes call it. Ray is an
optional extra (``pip install 'loraplex[ray]'``): every module here imports without it, and only the
functions that build or run a deployment import ``ray``.
"""
