"""edp on AWS: Lambda entry points, the database secret, S3 backfill, boto3 clients.

Nothing here touches the network or imports boto3 at import time: clients are
made by :func:`edp.aws.clients.client` when a command or a handler needs them,
and fail with an install hint when the ``aws`` extra is missing.

* :mod:`edp.aws.handlers` - ``store_handler`` and ``emit_handler`` (``deploy/edp.yaml``);
* :mod:`edp.aws.secrets` - the database URL from a Secrets Manager secret;
* :mod:`edp.aws.backfill` - existing S3 objects fed to the engine as created events;
* :mod:`edp.aws.clients` - boto3 clients with edp's timeouts and retry policy;
* :mod:`edp.aws.bundle` - the Lambda deployment zip (``edp bundle``).
"""
