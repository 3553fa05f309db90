"""``clinic-edge selftest``: measure TTFT as ``vllm bench serve`` does, judge it, keep history.

Modules: :mod:`.metrics` (arithmetic on event timelines), :mod:`.client` (aiohttp streaming request → timeline,
readiness probes), :mod:`.workloads` (prompts, conversations, the synthetic radiograph), :mod:`.runner` (load
points), :mod:`.verdict` (SLOs and the judgement), :mod:`.result` (the schema-1 document), :mod:`.history` (files,
retention, table), :mod:`.report` (HTML).
"""
