"""`run.py train prior` on a tiny config: it trains, checkpoints, resumes, and saves a folder the prior loads."""

import json
import logging

import torch

import run
from pipelines.prior import Prior
from toyworld.model import build_tokenizer
from toyworld.train_prior import caption_table, pick_captions, render_bank

TINY = ["arch.image_size=16", "arch.vae_channels=[16, 16]", "arch.unet_channels=[32, 32, 32]", "arch.text_width=32",
        "arch.text_layers=1", "bank_size=32", "batch_size=4", "warmup_steps=1", "device=cpu", "--quiet"]


def test_train_prior_saves_loadable_model_and_resumes(tmp_path):
    out = tmp_path / "runs"
    assert run.main(["train", "prior", *TINY, "vae_steps=2", "unet_steps=2", "checkpoint_every=1", "--out", str(out)]) == 0
    [run_dir] = list((out / "train").iterdir())
    progress = json.loads((run_dir / "checkpoints" / "unet" / "progress.json").read_text())
    assert progress["stage"] == "unet" and progress["step"] == 2 and progress["seconds"] > 0
    prior = Prior.from_pretrained(str(run_dir / "model"))
    assert prior.default_size == 16 and prior.unet.dtype == torch.float32  # fp16 on disk, fp32 on CPU
    assert abs(prior.scaling_factor - json.loads((run_dir / "model" / "training.json").read_text())["scaling_factor"]) < 1e-6
    before = {k: v.clone() for k, v in prior.unet.state_dict().items()}

    # resume to more steps: the same run directory, continuing from step 2
    assert run.main(["train", "prior", f"resume={run_dir}", "--quiet"]) == 0  # already complete: saves again
    assert run.main(["train", "prior", f"resume={run_dir}", "unet_steps=4", "--quiet"]) == 0
    meta = json.loads((run_dir / "metadata.json").read_text())
    assert meta["steps"] == {"vae": 2, "unet": 4} and len(meta["sessions"]) == 3
    after = Prior.from_pretrained(str(run_dir / "model")).unet.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_fine_tune_from_a_trained_prior_keeps_its_vae(tmp_path):
    """init= fine-tunes a trained prior: VAE, scaling and tokenizer kept, UNet trained, on off-centre objects."""
    first = tmp_path / "first"
    assert run.main(["train", "prior", *TINY, "vae_steps=2", "unet_steps=1", "--out", str(first)]) == 0
    [base] = list((first / "train").iterdir())
    tuned = tmp_path / "tuned"
    assert run.main(["train", "prior", f"init={base / 'model'}", "bank_size=8", "batch_size=2", "unet_steps=2",
                     "device=cpu", "--quiet", "--out", str(tuned)]) == 0
    [run_dir] = list((tuned / "train").iterdir())
    a, b = Prior.from_pretrained(str(base / "model")), Prior.from_pretrained(str(run_dir / "model"))
    assert a.scaling_factor == b.scaling_factor
    assert all(torch.equal(x, y) for x, y in zip(a.vae.state_dict().values(), b.vae.state_dict().values()))
    assert any(not torch.equal(x, y) for x, y in zip(a.unet.state_dict().values(), b.unet.state_dict().values()))
    assert json.loads((run_dir / "metadata.json").read_text())["steps"] == {"vae": 0, "unet": 2}


def test_caption_table_variants():
    bank = render_bank(5, 16, seed=0, device=torch.device("cpu"), progress=False)
    tok = build_tokenizer()
    table = caption_table(bank, tok, seed=0)
    assert table.shape == (5, 4, tok.model_max_length)
    texts = [[tok.decode(ids, skip_special_tokens=True) for ids in row] for row in table]
    for row in texts:
        assert row[0].endswith(" view") and row[1].endswith(" view")
        assert "view" not in row[2] and "view" not in row[3]
    empty = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    cfg = type("C", (), {"p_drop_view": 0.0, "p_synonym": 0.0, "caption_dropout": 1.0})
    ids = pick_captions(table, empty, torch.arange(5), cfg, torch.Generator().manual_seed(0))
    assert (ids == empty).all()


def test_unknown_words_warn_but_do_not_fail(caplog):
    """The shipped ToyWorld model names the words it does not know, lists its vocabulary, and goes on."""
    prior = Prior.from_pretrained("toyworld")
    with caplog.at_level(logging.WARNING, logger="pipelines.prior"):
        text = prior.encode_prompt(["a red panda on a swing"])
    assert text.cond.shape[0] == 1
    assert "'panda'" in caplog.text and "'swing'" in caplog.text and "'red'" not in caplog.text.split("It knows")[0]
    assert "It knows: " in caplog.text and "model=sd15" in caplog.text
    caplog.clear()
    prior.encode_prompt(["a red cube, side view", "An orange cube"])
    assert "does not know" not in caplog.text


def test_an_reads_as_a_in_the_shipped_tokenizer_and_in_a_fresh_one():
    """The captions only say "a"; "an orange cube" gets exactly the ids of "a orange cube", not <unk>."""
    for tok in (Prior.from_pretrained("toyworld").tokenizer, build_tokenizer()):
        assert tok("An orange cube").input_ids == tok("a orange cube").input_ids
        assert tok("a banana").input_ids[2] == tok.unk_token_id  # whole words only


def test_default_model_is_toyworld(tmp_path):
    assert run.main(["image", "a red cube", "steps=2", "--out", str(tmp_path), "--quiet"]) == 0
    [d] = list((tmp_path / "image").iterdir())
    meta = json.loads((d / "metadata.json").read_text())
    assert meta["model"] == "toyworld" and (meta["height"], meta["width"]) == (64, 64)
