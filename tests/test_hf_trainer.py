"""ManifoldAdam inside Hugging Face's Trainer: a config-only tiny GPT-2 (random init, nothing
downloaded) trained a few steps with ``Trainer(optimizers=(ManifoldAdam(...), scheduler))``,
checkpointed, and resumed in a fresh model, optimizer and Trainer: the resumed run must end
bitwise where the uninterrupted one does."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from manifold_sgd import ManifoldAdam, native_info  # noqa: E402

STEPS, SAVE_AT, SEQ, VOCAB = 6, 3, 16, 64


class TokenData(torch.utils.data.Dataset):
    """Random token sequences: the test is about the optimizer's state, not the text."""

    def __init__(self, n: int = 64):
        gen = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def make_model():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def make_trainer(out_dir, backend):
    model = make_model()
    opt = ManifoldAdam(model.parameters(), lr=3e-3, weight_decay=0.01, second_moment="row", backend=backend)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 2) * (1 - s / (2 * STEPS)))
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), max_steps=STEPS, save_steps=SAVE_AT, per_device_train_batch_size=4,
        logging_steps=1, report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0, save_only_model=False,
        disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenData(), optimizers=(opt, sched))
    return trainer, model, opt


def on_sphere(model, opt):
    """Largest | ||row|| - 1 | over the optimizer's sphere tensors (manifold='auto': ndim >= 2)."""
    worst = 0.0
    for group in opt.param_groups:
        for p in group["params"]:
            if p.ndim >= 2:
                norms = p.detach().reshape(p.shape[0], -1).norm(dim=1)
                worst = max(worst, float((norms - 1).abs().max()))
    return worst


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_trainer_checkpoint_resumes_bitwise(tmp_path, backend):
    if backend == "native" and not native_info()["available"]:
        pytest.skip("no native build")
    full, full_model, full_opt = make_trainer(tmp_path / "full", backend)
    result = full.train()
    assert result.global_step == STEPS
    assert (tmp_path / "full" / f"checkpoint-{SAVE_AT}" / "optimizer.pt").exists()
    losses = [h["loss"] for h in full.state.log_history if "loss" in h]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    assert on_sphere(full_model, full_opt) < 1e-5
    steps = {int(s["step"]) for s in full_opt.state.values() if "step" in s}
    assert steps == {STEPS}

    resumed, resumed_model, resumed_opt = make_trainer(tmp_path / "resumed", backend)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / f"checkpoint-{SAVE_AT}"))
    for (name, a), b in zip(full_model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(a, b), f"{name} differs after resuming"
    for p_full, p_res in zip(full_model.parameters(), resumed_model.parameters()):
        sa, sb = full_opt.state[p_full], resumed_opt.state[p_res]
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), key
    # the scheduler was restored too: both end on the same learning rate
    assert full_opt.param_groups[0]["lr"] == resumed_opt.param_groups[0]["lr"]
