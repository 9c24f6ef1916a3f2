"""Bad checkpoints, bad prepared data and resumes that cannot continue exactly: one line each, a
non-zero exit, nothing on disk changed. Checkpoints from a user path never run code, and no secret
reaches the run folder or W&B."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import RunsCode

from llm.config import PrepareConfig, datamodule_args
from llm.data.prepare import prepared_dir
from llm.errors import ConfigError
from llm.redact import scrub, scrub_text
from support import (
    RUN_ENV,
    assert_refused,
    corpus_fit,
    llm_here,
    metrics_rows,
    program_stderr,
    run_llm,
    snapshot,
    word_tokenizer,
)

QUIET = {"WANDB_MODE": "disabled"}


@pytest.fixture
def trained(tmp_path, runs, code_corpus, data_cache):
    """A copy of the canonical one-process run (12 steps), and a data cache holding only its data,
    which tests may break: the originals are shared."""
    run, cache = tmp_path / "trained", tmp_path / "trained-data"
    shutil.copytree(runs("single"), run, symlinks=True)
    folder = prepared_dir(PrepareConfig(text=str(code_corpus), vocab_size=512, cache_dir=str(data_cache)))
    shutil.copytree(folder, cache / folder.name)
    return run, cache


def canonical_args(runs, run: Path, cache: Path, *extra: str) -> list[str]:
    return runs.args(run, f"--data.cache_dir={cache}", *extra, probes=())


def unchanged(folder: Path, command):
    before = snapshot(folder)
    result = command()
    assert snapshot(folder) == before, "a refused command changed files on disk"
    return result


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("--model.config.n_layer=3", ["model.config.n_layer=3: the checkpoint", "has 2"]),
        (
            "--data.batch_size=8",
            ["tokens per step 512 (1 x 8 x 64 tokens x 1 processes): the checkpoint", "256 (1 x 4 x 64", "=256"],
        ),
        ("--seed_everything=7", ["seed_everything=7: the checkpoint", "was trained with 1337"]),
        ("--trainer.devices=2", ["tokens per step 512 (1 x 4 x 64 tokens x 2 processes)", "was trained with 256"]),
        ("--trainer.max_steps=12", ["trainer.max_steps=12: the checkpoint", "has already trained 12 steps"]),
        # the optimizer and schedule states keep these: a change would be recorded and not happen
        ("--model.optimizer.lr=0.0001", ["model.optimizer.lr=0.0001: the checkpoint", "INIT="]),
        ("--model.optimizer.warmup_steps=2", ["model.optimizer.warmup_steps=2: the checkpoint", "with 4"]),
        ("--model.optimizer.betas=[0.9,0.99]", ["model.optimizer.betas=(0.9, 0.99): the checkpoint"]),
        ("--data.split=tail", ["data.split=tail: the checkpoint", "ARGS=--data.split=auto"]),
    ],
    ids=["model-shape", "batch-size", "seed", "world-size", "no-more-steps", "lr", "warmup", "betas", "data-split"],
)
def test_resume_that_cannot_continue_exactly_is_refused(trained, runs, override, fragments):
    run, cache = trained
    args = canonical_args(runs, run, cache, "--resume=auto", override)
    assert_refused(unchanged(run, lambda: llm_here(*args)), *fragments)


@pytest.mark.slow
def test_a_deepspeed_checkpoint_on_another_split_needs_deepspeed_and_its_universal_state(tmp_path, runs):
    """On one process of 8 sequences, the same tokens per step: a ZeRO checkpoint is re-partitioned
    through DeepSpeed's universal checkpoint (tests/test_deepspeed.py), which needs DeepSpeed to load
    it and the client state every save now writes."""
    run = tmp_path / "run"
    shutil.copytree(runs("zero2"), run, symlinks=True)
    ckpt = run / "checkpoints" / "step-000010.ckpt"
    args = runs.args(run, "--data.batch_size=8", f"--resume={ckpt}", probes=())
    result = unchanged(run, lambda: llm_here(*args))
    assert_refused(result, "deepspeed=: the checkpoint", "is DeepSpeed's, partitioned for 2 processes", "DS=zero2")
    # as a checkpoint of an earlier version has it: without the state ds_to_universal needs
    states = ckpt / "checkpoint" / "mp_rank_00_model_states.pt"
    contents = torch.load(states, weights_only=False)
    del contents["universal_checkpoint_info"]
    torch.save(contents, states)
    result = unchanged(run, lambda: llm_here(*args, "--deepspeed=zero2"))
    assert_refused(result, f"resume={ckpt}: written without DeepSpeed's universal_checkpoint_info", "continue it on")


def test_extending_a_finished_run_says_its_learning_rate_stays_at_the_minimum(trained, runs):
    # its cosine ended at step 12: the two steps more go on at lr x min_lr_ratio, and say so
    run, cache = trained
    resumed = llm_here(*canonical_args(runs, run, cache, "--resume=auto", "--trainer.max_steps=14"), env=QUIET)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (
        "warning: trainer.max_steps 12 -> 14: continuing from step 12; the schedule ended at step 12: the learning "
        "rate stays at its minimum, 0.0003 (lr x min_lr_ratio)" in resumed.stdout
    ), resumed.stdout[-3000:]
    lrs = {step: float(row["train/lr"]) for step, row in metrics_rows(run).items() if row.get("train/lr")}
    assert lrs[13] == lrs[14] == pytest.approx(3e-4) and lrs[12] > 3e-4  # step 12 was the last to decay


def test_resume_on_other_text_is_refused_with_the_runs_own(tmp_path, trained, runs):
    run, cache = trained
    other = tmp_path / "other.txt"
    other.write_text("def g(y):\n    return y\n" * 300)
    args = canonical_args(runs, run, cache, "--resume=auto", "--trainer.max_steps=14", f"--data.text={other}")
    line = assert_refused(unchanged(run, lambda: llm_here(*args)), f"data.text={other}: the checkpoint")
    assert line.endswith(f"continue it on its own data (TEXT={runs.corpus}), or start a new RUN")


def test_a_run_folder_has_one_writer(tmp_path, trained, runs):
    """A training writing into the folder holds its lock: a second one started into it is refused
    before it writes anything, where both would pass the "already holds a run" check."""
    import fcntl

    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".writer", "w") as writer:  # what a training holds for as long as it runs
        fcntl.flock(writer, fcntl.LOCK_EX)
        writer.write("node-a 4242")
        writer.flush()
        result = llm_here(*canonical_args(runs, run, trained[1]))
    assert_refused(result, f"run={run}: another training (node-a 4242) writes into it now")
    assert sorted(p.name for p in run.iterdir()) == [".writer"]


def test_resume_auto_into_a_folder_of_something_else_is_refused(tmp_path, trained, runs):
    run = tmp_path / "theirs"
    run.mkdir()
    (run / "config.yaml").write_text("name: my other project\n")
    (run / "summary.json").write_text("{}")
    args = canonical_args(runs, run, trained[1], "--resume=auto")
    assert_refused(unchanged(run, lambda: llm_here(*args)), f"resume=auto: {run} holds no checkpoint to continue")


def test_resume_auto_without_a_run_is_refused(trained, runs):
    args = [a for a in canonical_args(runs, *trained, "--resume=auto") if not a.startswith("--run=")]
    assert_refused(llm_here(*args), "resume=auto: no run to continue was named", "RUN=")


def test_resume_from_a_file_that_is_no_checkpoint(tmp_path, trained, runs):
    bogus = tmp_path / "notes.ckpt"
    bogus.write_text("not a checkpoint")
    args = canonical_args(runs, tmp_path / "run", trained[1], f"--resume={bogus}")
    assert_refused(unchanged(tmp_path, lambda: llm_here(*args)), f"resume={bogus}: not a readable checkpoint")


def test_a_truncated_checkpoint(tmp_path, trained):
    whole = (trained[0] / "checkpoints" / "last.ckpt").read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(whole[: len(whole) // 2])
    assert_refused(
        llm_here("sample", f"--ckpt={cut}", "--prompt=x"), f"ckpt={cut}: not a readable checkpoint", "truncated"
    )


@pytest.mark.parametrize("command", ["sample", "eval", "fit"])
def test_a_checkpoint_that_would_run_code_is_refused_unread(tmp_path, trained, runs, command, monkeypatch):
    marker = tmp_path / "code-ran"
    monkeypatch.setenv("LLM_TEST_MARKER", str(marker))
    ckpt = torch.load(trained[0] / "checkpoints" / "last.ckpt", weights_only=False)
    ckpt["payload"] = RunsCode()
    bad = tmp_path / "bad.ckpt"
    torch.save(ckpt, bad)
    args = {
        "sample": ["sample", f"--ckpt={bad}", "--prompt=x"],
        "eval": ["eval", f"--ckpt={bad}", f"--text={trained[0] / 'config.yaml'}"],
        "fit": canonical_args(runs, tmp_path / "run", trained[1], f"--resume={bad}", "--trainer.max_steps=14"),
    }[command]
    field = "resume" if command == "fit" else "ckpt"
    assert_refused(llm_here(*args), f"{field}={bad}: holds objects other than tensors and plain data, refused unread")
    assert not marker.exists(), "loading the checkpoint ran its code"


def test_a_sharded_checkpoint_that_would_run_code_is_refused_unread(tmp_path, monkeypatch):
    marker = tmp_path / "code-ran"
    monkeypatch.setenv("LLM_TEST_MARKER", str(marker))
    folder = tmp_path / "step-000002.ckpt"
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "latest").write_text("checkpoint")
    torch.save({"llm_config": {}, "payload": RunsCode()}, folder / "checkpoint" / "mp_rank_00_model_states.pt")
    assert_refused(llm_here("sample", f"--ckpt={folder}", "--prompt=x"), "refused unread")
    assert not marker.exists()


def overwrite_a_fifth(folder: Path) -> None:
    """0xFF over a fifth of the shard, between the pieces a sampled checksum would read."""
    shard = folder / "train.bin"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.seek(size // 3)
        f.write(b"\xff" * (size // 5))


def broken_cache(tmp_path: Path, trained, damage) -> Path:
    cache = tmp_path / "data"
    shutil.copytree(trained[1], cache)
    folder = next(p for p in cache.iterdir() if (p / "meta.json").is_file())
    damage(folder)
    return cache


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda f: os.truncate(f / "train.bin", (f / "train.bin").stat().st_size // 2), "train.bin holds"),
        (lambda f: (f / "val.bin").write_bytes(bytes((f / "val.bin").stat().st_size)), "val.bin does not match"),
        (lambda f: (f / "meta.json").write_text('{"splits": '), "meta.json is not valid JSON"),
        (lambda f: (f / "val.bin").unlink(), "val.bin is missing"),
        (overwrite_a_fifth, "train.bin does not match its checksum"),
        (lambda f: word_tokenizer(f / "tokenizer.json", 512), "tokenizer.json does not match its checksum"),
    ],
    ids=["truncated-shard", "overwritten-shard", "corrupt-meta", "missing-shard", "fifth-overwritten", "tokenizer"],
)
def test_damaged_prepared_data_is_found_before_training(tmp_path, trained, runs, damage, fragment):
    cache = broken_cache(tmp_path, trained, damage)
    args = canonical_args(runs, tmp_path / "run", cache)
    line = assert_refused(unchanged(tmp_path, lambda: llm_here(*args)), "data.cache_dir: ", fragment)
    assert "remove the folder" in line


def test_a_corpus_too_small_for_one_block(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("a few words only, " * 20)
    args = corpus_fit(small, tmp_path / "run", tmp_path / "data", "--data.vocab_size=300")
    result = llm_here(*args)  # token counts exist only once the text is tokenized: its progress bars come first
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = program_stderr(result.stderr)[-1]
    assert last.startswith("error: model.config.block_size=64: the val split holds only"), last
    assert last.endswith("use a smaller block_size or more text")


def test_eval_on_a_split_shorter_than_one_block(tmp_path, trained):
    ckpt = torch.load(trained[0] / "checkpoints" / "last.ckpt", weights_only=False)
    small = tmp_path / "small.txt"
    small.write_text("x = 1\n" * 30)
    data = datamodule_args(ckpt["llm_config"]["data"])
    data.update(text=str(small), cache_dir=str(tmp_path / "data"), val_fraction=0.05)
    run = tmp_path / "other-data"  # a run folder of its own: eval follows its data there only
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(ckpt["llm_config"]))  # as its training wrote it
    path = run / "checkpoints" / "last.ckpt"
    torch.save(ckpt, path)
    result = llm_here("eval", f"--ckpt={path}", "--wandb=false")  # prepares that text first, with progress bars
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = program_stderr(result.stderr)[-1]
    assert (
        last.startswith(f"error: ckpt={path}: the validation split of its data")
        and "fewer than one block of 65" in last
    )


def test_eval_never_follows_the_paths_inside_a_checkpoint_from_elsewhere(tmp_path, trained):
    """A checkpoint someone sent: its config names a file to read, a cache to write and a run folder
    whose W&B run to append to. None of them is touched; its own data needs its run folder."""
    ckpt = torch.load(trained[0] / "checkpoints" / "last.ckpt", weights_only=False)
    secret, victim, cache = tmp_path / "id_ed25519", tmp_path / "victim", tmp_path / "attacker-cache"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n" + "x" * 4000)
    shutil.copytree(trained[0], victim, symlinks=True)  # a run folder with a W&B run
    ckpt["llm_config"]["data"].update(text=str(secret), cache_dir=str(cache))
    ckpt["llm_config"]["run"] = str(victim)
    sent = tmp_path / "downloads" / "model.ckpt"
    sent.parent.mkdir()
    torch.save(ckpt, sent)
    before = snapshot(victim)
    refused = llm_here("eval", f"--ckpt={sent}")
    assert_refused(refused, f"ckpt={sent}: not in a run folder (runs/<name>/checkpoints/)")
    text = tmp_path / "mine.txt"
    text.write_text("def f(x):\n    return x\n" * 200)
    on_text = llm_here("eval", f"--ckpt={sent}", f"--text={text}", "--json=true")
    assert on_text.returncode == 0, on_text.stderr[-3000:]
    assert not cache.exists() and snapshot(victim) == before and not (victim / "eval").exists()


def test_text_that_is_not_utf8_is_reported_with_the_bytes_replaced(tmp_path):
    text = tmp_path / "latin1.txt"
    text.write_bytes(("def café():\n    return 'naïve'\n" * 400).encode("latin-1"))
    result = llm_here(
        "prepare",
        "--config",
        "configs/experiment/default.yaml",
        f"--data.text={text}",
        f"--data.cache_dir={tmp_path / 'data'}",
        "--data.vocab_size=300",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"warning: data.text={text}: 800 bytes are not UTF-8" in result.stdout + result.stderr


SECRETS = {
    "hf": "hf_" + "a1B2c3D4e5" * 3,
    "wandb": "0123456789abcdef" * 2 + "01234567",
    "openai": "sk-" + "x9Y8z7" * 5,
    "github": "ghp_" + "Ab1Cd2Ef3G" * 4,
    "github_fine": "github_pat_" + "11AB22CD33" * 4,
    "aws": "AKIA" + "ABCDEFGHIJKLMNOP",
    "slack": "xoxb-" + "1234567890-0987654321-" + "aBcDeFgHiJkL" * 2,
    "jwt": "eyJhbGciOiJIUzI1NiJ9" + ".eyJzdWIiOiIxMjM0NTY3ODkwIn0" + ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV",
    "pem": "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA0Z3VS5JJcds3xfn\n-----END RSA PRIVATE KEY-----",
}


@pytest.mark.parametrize("name", sorted(SECRETS))
def test_every_secret_form_is_scrubbed(name):
    secret = SECRETS[name]
    assert scrub({"note": secret})["note"] == "<redacted>"
    assert secret not in scrub_text(f"--data.hf_split=x --value={secret} tail")


def test_secret_keys_and_url_credentials_are_scrubbed():
    config = {"token": "abc", "private_key": "k", "hf_token": "t", "tokenizer": "data/tokenizer.json", "max_tokens": 5}
    config |= {"cookie": "session=1f2e", "flops_per_token": 6e9, "eot_token": "<|endoftext|>"}  # the last two: ours
    redacted = {k: "<redacted>" for k in ("token", "private_key", "hf_token", "cookie")}
    assert scrub(config) == {**config, **redacted}
    assert scrub_text("https://alice:s3cr3t@example.com/corpus") == "https://<redacted>@example.com/corpus"


def test_ordinary_values_shaped_a_little_like_secrets_are_kept():
    snapshot = "/hub/models--gpt2/snapshots/607a30d783dfa663caf39e06633721c8d4cfcd7e/config.json"
    for value in (snapshot, "task-classification_corpus", "data/ask-questions-and-answers-corpus.txt"):
        assert scrub({"text": value}) == {"text": value} and scrub_text(value) == value


def test_no_secret_reaches_the_run_folder_wandb_a_checkpoint_the_data_or_an_export(tmp_path, trained, runs):
    secret, named, group = SECRETS["github"], SECRETS["hf"], SECRETS["slack"]
    run, cache = tmp_path / "run", tmp_path / "data"
    text = tmp_path / f"{named}.txt"  # a file named like a token
    shutil.copy(runs.corpus, text)
    # a field that takes any text and changes nothing here (the Hub split, unused with local text)
    split = f"--data.hf_split=https://bot:{secret}@example.com"
    args = runs.args(run, f"--data.cache_dir={cache}", split, f"--data.text={text}", f"--experiment={group}", probes=())
    result = run_llm(*args, "--trainer.max_steps=2", env=RUN_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    export = llm_here("export", f"--ckpt={run}/checkpoints/last.ckpt", f"--out={tmp_path / 'hf'}")
    assert export.returncode == 0, export.stderr[-3000:]
    written = [p for folder in (run, cache, tmp_path / "hf") for p in folder.rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"config.yaml", "meta.json", "README.md", "last.ckpt", "summary.json"}
    for token in (secret, named, group):
        assert token not in result.stdout + result.stderr
        leaks = [str(p) for p in written if token.encode() in p.read_bytes() or token in str(p)]
        assert not leaks, f"the secret was written to {leaks}"
    assert "hf_split: https://<redacted>@example.com" in (run / "config.yaml").read_text()
    # W&B recorded the command line (in its run file, offline), with the credentials taken out
    records = b"".join(p.read_bytes() for p in (run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert b"--data.hf_split=https://<redacted>@example.com" in records


def test_ckpt_may_be_a_run_folder_or_left_out(tmp_path, trained, monkeypatch):
    """A run folder means its newest complete checkpoint; no CKPT= the newest of any run under runs/;
    each choice said in one line."""
    from llm.checkpointing.files import choose_checkpoint

    run = trained[0]
    newest = max((run / "checkpoints").glob("step-*.ckpt"))
    said = llm_here("sample", f"--ckpt={run}", "--prompt=def ", "--max_new_tokens=4")
    assert said.returncode == 0, said.stderr
    assert f"ckpt: {newest} (run {run})" in said.stderr
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="none given, and no run under runs/ has one; train one"):
        choose_checkpoint("")
    for name, age in (("older", 100), ("newer", 0), ("unfinished", -100)):
        shutil.copytree(run / "checkpoints", tmp_path / "runs" / name / "checkpoints", symlinks=True)
        for path in (tmp_path / "runs" / name / "checkpoints").glob("step-*"):
            os.utime(path, (newest.stat().st_mtime - age,) * 2)
    for path in (tmp_path / "runs" / "unfinished" / "checkpoints").glob("step-*"):
        path.write_bytes(b"cut short")  # no zip: not complete, so never chosen however new
    assert choose_checkpoint("") == f"runs/newer/checkpoints/{newest.name}"
    with pytest.raises(
        ConfigError, match="ckpt=runs/unfinished: no complete checkpoint in runs/unfinished/checkpoints"
    ):
        choose_checkpoint("runs/unfinished")


def tamper(ckpt_path: Path, secret: Path, cache: Path) -> None:
    """The checkpoint's saved config made to name a file to read and a cache to write, in place."""
    ckpt = torch.load(ckpt_path, weights_only=False)
    datamodule_args(ckpt["llm_config"]["data"]).update(text=str(secret), cache_dir=str(cache))
    target = ckpt_path.resolve()
    target.unlink()
    torch.save(ckpt, target)


def test_eval_in_a_run_folder_takes_its_data_from_the_folders_config_not_the_checkpoint(tmp_path, trained):
    """A checkpoint placed in a run folder (or edited there) cannot make make eval read another file
    or write another cache: the folder's config.yaml, which the user's own training wrote, names the data."""
    run, cache = trained
    secret, evil = tmp_path / "id_rsa", tmp_path / "evilcache"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n" + "x" * 4000)
    tamper(run / "checkpoints" / "last.ckpt", secret, evil)
    before = snapshot(run)
    answer = llm_here("eval", f"--ckpt={run / 'checkpoints' / 'last.ckpt'}", "--wandb=false")
    assert_refused(answer, "its data.text", f"({secret}) is not its run folder's", "give TEXT= or HF=")
    assert not evil.exists() and snapshot(run) == before
