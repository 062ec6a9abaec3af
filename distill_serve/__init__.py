"""distill-serve: a student (model directory or export) behind an HTTP inference endpoint
(`GET /ping`, `POST /invocations`, `GET /metrics`) with dynamic batching."""
