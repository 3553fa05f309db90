"""The memory planner: size vLLM to fit the box exactly as vLLM itself will account for it.

``model_config`` reads what matters from config.json, ``safetensors_header`` weighs the checkpoint from its headers,
``hardware_profile`` says how much memory each GPU has, ``accounting`` reproduces vLLM's budget and KV-cache block
math, ``topology`` chooses replicas or tensor parallelism, ``render`` prints the budget table and ``envfile`` writes
the files the systemd units read. See docs/planner.md.
"""
