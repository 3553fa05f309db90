"""The memory planner: size vLLM to fit the box exactly as vLLM itself will account for it.

``model_config`` reads what matters from config.json, ``safetensors_header`` weighs the checkpoint from its headers,
``hardware_profile`` says how much memory each GPU has, ``accounting`` reproduces vLLM's budget and KV-cache block
math, ``topology`` chooses replicas or tensor parallelism, ``unified`` sizes vLLM for unified memory (DGX Spark),
``flag_reasons`` says why each flag has its value, ``render`` prints the budget table, ``envfile`` writes the files
the systemd units read and ``start_gate`` checks free memory right before vLLM starts. See docs/planner.md.
"""
