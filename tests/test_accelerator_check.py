"""benchmarks/accelerator_check.py on its CPU path (no accelerator is lent to CI): one JSON with every section's
status and seconds, sections beyond the budget skipped with the reason, MFU consistent with the recorded numbers;
the pieces only a GPU run reaches (the retention command, the parsers, clu's TensorFlow-free writer) alone."""

import json
import os
import statistics
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import accelerator_check as ac  # noqa: E402


@pytest.fixture(scope="module")
def micro_check(tmp_path_factory):
  out = tmp_path_factory.mktemp("check") / "check.json"
  result = ac.main(["--budget=300", "--sections=facts,bench,attention,retention", "--bench_cases=pretrain:float32",
                    "--bench_steps=1", "--bench_rounds=2", "--bench_warmup=0", "--matmul_size=128",
                    "--attn_shapes=17x2x8", "--attn_reps=1", "--min_seconds=retention:100000", f"--out={out}"])
  with open(out) as f:
    return result, json.load(f)


def test_the_json_holds_every_section_with_its_status_and_seconds(micro_check):
  result, saved = micro_check
  assert saved["platform"] == "cpu" and saved["budget_s"] == 300
  assert saved["git"]["commit"] and saved["started"] <= saved["finished"] and "--budget=300" in saved["command"]
  assert sorted(saved["sections"]) == sorted(ac.SECTIONS) and saved["section_order"] == list(ac.SECTIONS)
  for name, s in saved["sections"].items():
    assert s["status"] in ("ok", "skipped", "not selected", "partial", "failed", "error"), name
    assert s["seconds"] >= 0
  s = saved["sections"]
  assert s["tests"]["status"] == "not selected"
  # A section the budget cannot hold is skipped with the reason, and nothing of it ran.
  assert s["retention"]["status"] == "skipped" and "budget" in s["retention"]["reason"]
  assert s["retention"]["seconds"] == 0.0
  facts = s["facts"]
  assert facts["status"] == "ok" and facts["platform"] == "cpu" and facts["jax"] and facts["devices"]
  assert s["bench"]["status"] == "ok" and s["attention"]["status"] == "ok"
  assert saved["summary"]["sections"]["retention"]["status"] == "skipped"
  assert saved["summary"]["bench"][0]["mfu"] == pytest.approx(s["bench"]["rows"][0]["jax_mfu"], abs=1e-4)
  assert result["sections"]["bench"]["rows"][0]["jax_mfu"] == pytest.approx(s["bench"]["rows"][0]["jax_mfu"])


def test_mfu_and_images_per_second_follow_from_the_recorded_numbers(micro_check):
  _, saved = micro_check
  bench = saved["sections"]["bench"]
  (row,) = bench["rows"]
  assert (row["program"], row["dtype"], row["model"]) == ("pretrain", "float32", "micro")
  step = statistics.median(row["jax_step_s"])
  assert len(row["jax_step_s"]) == 2 and row["jax_step_s_median"] == pytest.approx(step)
  assert row["jax_images_per_s"] == pytest.approx(row["batch"] / step)
  # MFU = XLA's FLOPs per step / median step time / the highest matmul peak of the session in the row's dtype.
  assert row["mfu_peak_flops"] == max(bench["start_peak_flops"]["float32"] + row["round_peak_flops"])
  assert row["jax_mfu"] == pytest.approx(row["flops_per_step"] / step / row["mfu_peak_flops"])
  assert 0 < row["jax_mfu"] < 1 and row["flops_per_step"] > 0
  assert bench["target"] is None  # the bf16 target is an accelerator's


def test_attention_section_times_each_implementation_against_the_models(micro_check):
  _, saved = micro_check
  att = saved["sections"]["attention"]
  (res,) = att["results"]
  assert res["shape"] == [2, 17, 2, 8] and res["dtype"] == "bfloat16"
  rows = res["implementations"]
  model = rows["model: flax.linen.dot_product_attention"]
  assert model["status"] == "ok" and model["max_abs_diff_to_model"] == 0.0
  for name, r in rows.items():
    if "cudnn" in name:
      assert r["status"] == "skipped" and "GPU" in r["reason"]
    else:
      assert r["status"] == "ok" and r["forward_backward_s"] > 0 and r["max_abs_diff_to_model"] < 0.05
      assert r["forward_tflops"] == pytest.approx(res["forward_flops"] / r["forward_s"] / 1e12)
  assert "flax.linen.dot_product_attention" in att["model_attention"]
  assert att["model_block_uses_cudnn_fused_attention"] is False


def test_a_spent_budget_skips_every_section_after_the_facts(tmp_path):
  out = tmp_path / "spent.json"
  ac.main(["--budget=0", f"--out={out}"])
  with open(out) as f:
    saved = json.load(f)
  assert saved["sections"]["facts"]["status"] == "ok"
  for name in ("tests", "bench", "attention", "retention"):
    s = saved["sections"][name]
    assert s["status"] == "skipped" and "budget: 0 s of 0 s left" in s["reason"], name
  assert saved["sections"]["retention"]["reason"].startswith("CPU path: too slow for the budget")


def test_bench_cases_leave_the_later_sections_their_least_time(tmp_path):
  out = tmp_path / "reserve.json"
  ac.main(["--budget=200", "--sections=facts,bench,attention", "--min_seconds=bench:60,attention:150",
           "--attn_shapes=17x2x8", "--attn_reps=1", f"--out={out}"])
  with open(out) as f:
    s = json.load(f)["sections"]
  assert s["bench"]["status"] == "skipped" and not s["bench"]["rows"] and len(s["bench"]["skipped_cases"]) == 4
  assert all("after the later sections' least (150 s)" in c["reason"] for c in s["bench"]["skipped_cases"])
  assert s["attention"]["status"] == "ok"  # the time it was left
  assert s["retention"]["status"] == "not selected"


def test_the_gpu_retention_command_and_the_parsers():
  args = ac.parse_args(["--retention_steps=300"])
  ac.fill_defaults(args, "gpu")
  assert (args.bench_model, args.bench_batch_pretrain, args.bench_batch_invert) == ("base", 256, 64)
  cmd = ac.retention_command(args, {}, "/w")
  assert "--config=configs/retention.py:quick" in cmd and "--config.total_steps=300" in cmd
  assert "--config.model.width=384" in cmd and "--config.model.depth=12" in cmd
  assert "--config.retention.seeds=(0,)" in cmd and "--config.retention.methods=('seqssl','invcoss')" in cmd
  log = ("I1203 sequence.py:394] stage_1_xray: 300 steps (4708 examples of [(32, 32, 3)]; per step [64] current"
         " + [] buffer from []), mesh {'data': 1}\n"
         "I1203 logging_writer.py:48] [300] train/loss=0.5, train/steps_per_sec=412.5\n"
         "I1203 evaluate.py:271] retention: seed 0 seqssl stage_1_xray measured: {'xray': 0.9}\n"
         "I1203 retention.py:136] retention [2/3] seed 0: seqssl done in 27 s; elapsed 31 s, ETA 27 s\n")
  figures = ac._retention_figures(log, "/nonexistent")
  assert figures["steps_per_sec"] == [412.5] and figures["units_done"] == ["seed 0: seqssl done in 27 s"]
  assert figures["measured"] == ["seed 0 seqssl stage_1_xray measured: {'xray': 0.9}"]
  assert figures["stage_steps"][0].startswith("stage_1_xray: 300 steps")


def test_junit_parsing(tmp_path):
  xml = tmp_path / "r.xml"
  xml.write_text('<testsuites><testsuite><testcase classname="tests.a" name="t1" time="1.5"/>'
                 '<testcase classname="tests.a" name="t2" time="0.2"><failure message="boom"/></testcase>'
                 '<testcase classname="tests.b" name="t3" time="0"><skipped message="why"/></testcase>'
                 '</testsuite></testsuites>')
  got = ac.parse_junit(str(xml))
  assert got["counts"] == dict(passed=1, failed=1, error=0, skipped=1)
  assert [t["test"] for t in got["tests"]] == ["tests.a::t1", "tests.a::t2", "tests.b::t3"]
  assert got["tests"][1]["message"] == "boom"


def test_clu_imports_and_writes_event_files_without_tensorflow(tmp_path):
  # The GPU machine has no TensorFlow: with it blocked, the shim lets train.pretrain import and the writer write.
  code = textwrap.dedent(f"""\
      import importlib.abc, os, sys
      class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
          if name.split('.')[0] == 'tensorflow':
            raise ImportError('no TensorFlow here')
      sys.meta_path.insert(0, Block())
      os.environ['INVCOSS_FORCE_CLU_SHIM'] = '1'
      sys.path.insert(0, {os.path.join(REPO, 'benchmarks')!r})
      import accelerator_check
      assert accelerator_check.load_shim().install()
      from invcoss_jax.train import pretrain, writers
      w = writers.create_writer({str(tmp_path)!r})
      w.write_scalars(1, {{'a': 1.0}})
      w.close()
      assert not any(m.split('.')[0] == 'tensorflow' for m in sys.modules)
      print(sorted(os.listdir({str(tmp_path)!r})))
      """)
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "events.out.tfevents" in r.stdout
