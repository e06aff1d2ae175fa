"""Web framework integrations: ``integrations.fastapi`` and ``integrations.flask``.

Each module imports its framework when it is imported itself (never by ``import modelcache``);
without the framework installed, the import fails with the ``pip install`` line to run.
Both serve the same routes and the same JSON: ``/health``, ``/ready``, ``/models`` (a live
page for a browser) and ``POST /models/{name}/load``.
"""
