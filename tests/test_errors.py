"""Bad input: one line on stderr naming the field, the value and the fix; exit status 2; nothing
on disk touched. Checked in this process (a refusal comes before any training), and once through
`make` in a process of its own."""

from __future__ import annotations

import subprocess

import pytest

from support import REPO, TINY, assert_refused, llm_here, snapshot, word_tokenizer


@pytest.fixture
def existing(tmp_path):
    """A run folder and a data cache that already hold work, which a bad command must not touch."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"not really a checkpoint")
    (run / "metrics.csv").write_text("step,train/loss\n0,9.0\n")
    cache = tmp_path / "data"
    (cache / "prepared-0123").mkdir(parents=True)
    (cache / "prepared-0123" / "meta.json").write_text("{}")
    return run, cache


def fit_into(existing, *args):
    run, cache = existing
    before = snapshot(run.parent)
    result = llm_here(
        "fit",
        "--config",
        "configs/experiment/default.yaml",
        *TINY,
        f"--run={run}",
        "--resume=auto",
        f"--data.cache_dir={cache}",
        "--trainer.max_steps=2",
        *args,
    )
    assert snapshot(run.parent) == before, "a refused command changed files on disk"
    return result


def test_missing_text_path(existing, tmp_path):
    result = fit_into(existing, f"--data.text={tmp_path}/nope.txt")
    assert_refused(result, f"data.text={tmp_path}/nope.txt", "no such file or folder", "give a .txt")


def test_n_embd_not_divisible_by_n_head(existing):
    result = fit_into(existing, "--model.config.n_embd=100", "--model.config.n_head=3")
    assert_refused(result, "model.config.n_embd=100 is not divisible by n_head=3", "choose n_embd")


@pytest.mark.parametrize(
    "option, answer",
    [
        ("--eval_every=0", "eval_every=0: out of range; use a positive number"),
        ("--eval_every=-1", "eval_every=-1: out of range"),
        ("--trainer.log_every_n_steps=0", "trainer.log_every_n_steps=0: out of range; use 1 or more"),
        ("--trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0: out of range"),
        ("--data.batch_size=0", "data.batch_size=0: out of range"),
        ("--data.num_workers=-1", "data.num_workers=-1: out of range"),
        ("--model.optimizer.lr=-1", "model.optimizer.lr=-1.0: out of range; use a positive learning rate"),
        ("--model.optimizer.betas=[2,2]", "model.optimizer.betas=[2.0, 2.0]: out of range; use two in [0, 1)"),
        ("--model.config.dropout=2", "model.config.dropout=2.0 is a probability"),
        ("--model.config.block_size=0", "model.config.block_size=0 must be a positive number"),
        ("--tokens_per_step=0", "tokens_per_step=0: out of range; use a positive number of tokens"),
        # micro-batches of 8 x 64 tokens on 1 process: 512 tokens
        (
            "--tokens_per_step=1000",
            "tokens_per_step=1000: not a whole number of micro-batches of 8 x 64 tokens x 1 processes (512 tokens); "
            "use tokens_per_step=512 or 1,024",
        ),
        ("--tokens_per_step=384", "use tokens_per_step=512, or data.batch_size=6"),
    ],
)
def test_a_number_out_of_its_range_is_one_line(existing, option, answer):
    assert_refused(fit_into(existing, option), answer)


@pytest.mark.parametrize(
    "options, answer",
    [
        (["--data.batch_size=auto"], "data.batch_size=auto: needs tokens_per_step, so that the optimizer step stays"),
        (
            ["--data.batch_size=auto", "--tokens_per_step=100"],
            "tokens_per_step=100: not a whole number of sequences of 64 tokens x 1 processes (64 tokens); "
            "use tokens_per_step=64",
        ),
        (["--deepspeed=auto", "--memory_gib=-1"], "memory_gib=-1.0: out of range; use the GiB of one device"),
        # 1 GiB of it is what a CPU process holds before its model: nothing fits in 0.5
        (
            ["--deepspeed=auto", "--memory_gib=0.5"],
            "deepspeed=auto: nothing fits 0.50 GiB per device (--memory_gib) at a micro-batch of 8; even "
            "zero3_offload needs 1.0",
        ),
    ],
)
def test_sizing_to_memory_refuses_what_cannot_be(existing, options, answer):
    assert_refused(fit_into(existing, *options), answer)


def test_validation_is_set_in_optimizer_steps_not_lightnings_batches(existing):
    assert_refused(
        fit_into(existing, "--trainer.val_check_interval=5"),
        "trainer.val_check_interval=5: a run validates every eval_every optimizer steps; give eval_every instead",
    )


def test_tokens_per_step_counts_every_process(existing):
    result = fit_into(existing, "--trainer.devices=2", "--tokens_per_step=1536")
    assert_refused(
        result, "8 x 64 tokens x 2 processes (1,024 tokens); use tokens_per_step=1,024 or 2,048, or data.batch_size=6"
    )


def test_tokenizer_larger_than_the_model_vocabulary(existing, tmp_path):
    tokenizer = word_tokenizer(tmp_path / "tokenizer.json", 1500)
    result = fit_into(existing, f"--data.tokenizer={tokenizer}", "--model.config.vocab_size=1000")
    assert_refused(result, "model.config.vocab_size=1000", "1500", "at least 1500")


def test_empty_corpus(existing, tmp_path):
    (tmp_path / "empty.txt").write_text("\n   \n")
    result = fit_into(existing, f"--data.text={tmp_path}/empty.txt")
    assert_refused(result, "empty.txt", "holds no text")


def test_missing_tokenizer_file(existing, tmp_path):
    result = fit_into(existing, f"--data.tokenizer={tmp_path}/tok.json")
    assert_refused(result, f"data.tokenizer={tmp_path}/tok.json", "no such file")


def test_16_mixed_on_cpu(existing):
    result = fit_into(existing, "--trainer.precision=16-mixed")
    assert_refused(result, "trainer.precision=16-mixed", "needs a GPU", "bf16-mixed")


def test_a_run_folder_in_use_is_not_reused_without_resume(existing):
    run, cache = existing
    before = snapshot(run)
    result = llm_here(
        "fit",
        "--config",
        "configs/experiment/default.yaml",
        *TINY,
        f"--run={run}",
        f"--data.cache_dir={cache}",
        "--trainer.max_steps=2",
    )
    assert_refused(result, f"run={run}", "already holds a run", "RESUME=auto")
    assert snapshot(run) == before


def test_unknown_option(existing):
    assert_refused(fit_into(existing, "--trainer.max_stepz=3"), "max_stepz")


@pytest.mark.long  # through make, in a process of its own (the in-process twin runs in make test)
def test_unknown_model_preset_through_make(tmp_path):
    result = subprocess.run(
        ["make", "-s", "train", "MODEL=gpt5", f"RUN={tmp_path}/r"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_refused(result, "model.config=configs/model/gpt5.yaml", "no such config file", "configs/model/")
    assert not (tmp_path / "r").exists()


def test_a_run_folder_that_is_a_file(tmp_path):
    notes = tmp_path / "notes"
    notes.write_text("mine")
    args = ["fit", "--config", "configs/experiment/default.yaml", *TINY, f"--run={notes}", "--trainer.max_steps=2"]
    assert_refused(llm_here(*args, f"--data.cache_dir={tmp_path / 'data'}"), f"run={notes}: is a file")
    assert notes.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


def test_a_disk_without_room_for_one_checkpoint_is_refused_before_anything_is_written(existing):
    # 200 layers of 16384: about 650 billion parameters, 7 TiB a checkpoint (counted, never allocated)
    big = ["--model.config.n_layer=200", "--model.config.n_embd=16384", "--model.config.n_head=128"]
    assert_refused(fit_into(existing, *big), "GiB free, and one checkpoint of this model takes about", "larger disk")


@pytest.mark.parametrize(
    "option, answer",
    [
        ("--trainer.precision=fp16", "trainer.precision=fp16: not a valid value; did you mean 16-mixed or bf16-mixed?"),
        ("--model.config.mlp=swiglus", "model.config.mlp=swiglus: not a valid value; did you mean swiglu? (one of"),
        ("--lr=1e-3", "--lr=1e-3: no such option; did you mean --model.optimizer.lr?"),
        ("--model.optimizer.learning_rate=1e-3", "did you mean --model.optimizer.lr?"),
        ("--trainer.max_stepz=3", "--trainer.max_stepz=3: no such option; did you mean --trainer.max_steps?"),
        ("--data.batchsize=3", "--data.batchsize=3: no such option; did you mean --data.batch_size?"),
        ("--model.config.n_layer=four", "model.config.n_layer=four: not a whole number"),
        ("--config=configs/experiment/gpt2.yaml", "no such config file; configs/experiment/ has default, gpt2-124m"),
        ("--model.config=configs/model/gpt2.yaml", "configs/model/ has gpt2-1.5b, gpt2-124m, gpt2-350m"),
    ],
)
def test_a_refused_option_or_value_suggests_the_nearest_valid_one(existing, option, answer):
    assert_refused(fit_into(existing, option), answer)


def fit_args(run, cache, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        "configs/experiment/default.yaml",
        *TINY,
        f"--run={run}",
        f"--data.cache_dir={cache}",
        *extra,
    ]


@pytest.mark.parametrize("devices", ["abc", "0,1", "-1"])
def test_devices_that_are_no_number_are_refused_before_any_folder_is_made(tmp_path, devices):
    # Lightning's CPU accelerator would end in a TypeError, after the run folder was made
    run = tmp_path / "run"
    answer = llm_here(*fit_args(run, tmp_path / "data", f"--trainer.devices={devices}", "--trainer.max_steps=2"))
    assert_refused(answer, f"trainer.devices={devices}: not a number of devices; give a whole number (DEVICES=2)")
    assert not run.exists()


def test_a_start_that_crashed_does_not_block_the_next(tmp_path, fixture_text, fixture_tokenizer):
    """A run that fails after its folder exists (config.yaml and W&B's files written) and before its
    first step leaves nothing of a run: the same RUN= starts again, without RESUME=."""
    run, cache = tmp_path / "run", tmp_path / "data"
    args = fit_args(run, cache, f"--data.text={fixture_text}", f"--data.tokenizer={fixture_tokenizer}")
    args += ["--trainer.max_steps=2", "--data.val_batches=1", "--eval_every=2"]
    quiet = {"WANDB_MODE": "offline"}
    with pytest.raises(RuntimeError, match="crashed at the start, on purpose"):
        llm_here(*args, '--trainer.callbacks=[{"class_path": "tests.helpers.CrashAtStart"}]', env=quiet)
    assert {"config.yaml", "wandb"} <= {p.name for p in run.iterdir()}
    again = llm_here(*args, env=quiet)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (run / "summary.json").is_file()
    # the finished run is a run: the next start into it is refused
    assert_refused(llm_here(*args, env=quiet), f"run={run}: already holds a run")


@pytest.mark.parametrize("where", ["other", "repository"])
def test_a_folder_of_other_files_is_not_taken_for_a_run(tmp_path, where):
    run = tmp_path / "mine" if where == "other" else REPO
    if where == "other":
        run.mkdir()
        (run / "notes.txt").write_text("mine")
    before = snapshot(run) if where == "other" else None
    answer = llm_here(*fit_args(run, tmp_path / "data", "--trainer.max_steps=2"))
    assert_refused(answer, f"run={run}: a folder of other files (", "not a run's", "choose another RUN")
    assert where != "other" or snapshot(run) == before


@pytest.mark.parametrize(
    ("option", "env", "shown"),
    [
        ("--wandb_project=sk-" + "a1" * 12, {}, "wandb_project=<redacted>"),
        ("", {"WANDB_ENTITY": "hf_" + "Ab3" * 8}, "WANDB_ENTITY=<redacted>"),
    ],
)
def test_a_wandb_project_or_entity_shaped_like_a_secret_is_refused(tmp_path, option, env, shown):
    # W&B keeps the project and entity as given in its own files and sends them with every sync
    args = fit_args(tmp_path / "run", tmp_path / "data", "--trainer.max_steps=2", *([option] if option else []))
    answer = llm_here(*args, env=env)
    line = assert_refused(answer, shown, "shaped like a secret", "WANDB_API_KEY")
    assert "a1a1" not in line and "Ab3Ab3" not in line
    assert not (tmp_path / "run").exists()
