"""Work on rq workers: queueing, when to train (``trigger``), bulk predictions (``bulk``),
progress, Redis (``redis_server``) and the worker itself (``worker``)."""
