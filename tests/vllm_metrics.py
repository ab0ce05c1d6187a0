"""A ``/metrics`` body shaped like vLLM 0.32's: the same series names, labels and histogram
layout (the process and Python collectors first, then every ``vllm:`` family), so the parser
and the test engines read what a real engine sends. ``engines`` > 1 repeats every ``vllm:``
series per data-parallel rank, as vLLM does with its ``engine`` label."""

from __future__ import annotations

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                   2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
HISTOGRAMS = {
    "time_to_first_token_seconds": LATENCY_BUCKETS,
    "inter_token_latency_seconds": LATENCY_BUCKETS,
    "request_time_per_output_token_seconds": LATENCY_BUCKETS,
    "e2e_request_latency_seconds": LATENCY_BUCKETS,
    "request_queue_time_seconds": LATENCY_BUCKETS,
    "request_inference_time_seconds": LATENCY_BUCKETS,
    "request_prefill_time_seconds": LATENCY_BUCKETS,
    "request_decode_time_seconds": LATENCY_BUCKETS,
    "request_prompt_tokens": TOKEN_BUCKETS,
    "request_generation_tokens": TOKEN_BUCKETS,
    "iteration_tokens_total": TOKEN_BUCKETS,
    "request_max_num_generation_tokens": TOKEN_BUCKETS,
    "request_params_n": TOKEN_BUCKETS,
    "request_params_max_tokens": TOKEN_BUCKETS,
}


def metrics_text(running: float = 0, waiting: float = 0, kv_cache: float = 0.0, *,
                 model: str = "chat-model", engines: int = 1) -> str:
    """The body; ``running``, ``waiting`` and ``kv_cache`` are each rank's values."""
    lines = ["# HELP python_gc_objects_collected_total Objects collected during gc",
             "# TYPE python_gc_objects_collected_total counter"]
    lines += [f'python_gc_objects_collected_total{{generation="{g}"}} {g * 97 + 11}.0'
              for g in range(3)]
    lines += ["# HELP process_resident_memory_bytes Resident memory size in bytes.",
              "# TYPE process_resident_memory_bytes gauge",
              "process_resident_memory_bytes 1.23456789e+09",
              "process_cpu_seconds_total 123.45", "process_open_fds 57.0"]
    ranks = [f'engine="{e}",model_name="{model}"' for e in range(engines)]

    def family(name: str, kind: str, help_text: str, samples: list[str]) -> None:
        lines.extend([f"# HELP vllm:{name} {help_text}", f"# TYPE vllm:{name} {kind}",
                      *samples])

    family("num_requests_running", "gauge", "Number of requests in model execution batches.",
           [f"vllm:num_requests_running{{{r}}} {float(running)}" for r in ranks])
    family("num_requests_waiting", "gauge", "Number of requests waiting to be processed.",
           [f"vllm:num_requests_waiting{{{r}}} {float(waiting)}" for r in ranks])
    family("num_requests_waiting_by_reason", "gauge", "Waiting requests by reason.",
           [f'vllm:num_requests_waiting_by_reason{{{r},reason="{why}"}} {float(waiting)}'
            for r in ranks for why in ("capacity", "deferred")])
    family("kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.",
           [f"vllm:kv_cache_usage_perc{{{r}}} {kv_cache}" for r in ranks])
    for name in ("prefix_cache_queries_total", "prefix_cache_hits_total",
                 "num_preemptions_total", "prompt_tokens_total", "generation_tokens_total"):
        family(name, "counter", f"{name} counter.", [f"vllm:{name}{{{r}}} 4096.0" for r in ranks])
    family("request_success_total", "counter", "Count of successfully processed requests.",
           [f'vllm:request_success_total{{{r},finished_reason="{why}"}} 12.0'
            for r in ranks for why in ("stop", "length", "abort", "error")])
    family("cache_config_info", "gauge", "Information of the LLMEngine CacheConfig",
           [f'vllm:cache_config_info{{block_size="128",cache_dtype="auto",'
            f'enable_prefix_caching="True",engine="{e}",kv_cache_size_tokens="6144",'
            f'prefix_caching_hash_algo="sha256"}} 1.0' for e in range(engines)])
    for name, buckets in HISTOGRAMS.items():
        samples = []
        for r in ranks:
            samples += [f'vllm:{name}_bucket{{{r},le="{b}"}} {i}.0'
                        for i, b in enumerate(buckets)]
            samples += [f'vllm:{name}_bucket{{{r},le="+Inf"}} {len(buckets)}.0',
                        f"vllm:{name}_count{{{r}}} {len(buckets)}.0",
                        f"vllm:{name}_sum{{{r}}} 42.5"]
        family(name, "histogram", f"Histogram of {name}.", samples)
    return "\n".join(lines) + "\n"
