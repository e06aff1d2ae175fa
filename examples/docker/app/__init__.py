"""The example service: ``app.models`` lists the models, ``app.main`` serves them."""
