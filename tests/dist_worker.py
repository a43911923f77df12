"""Scenarios for tests/test_distributed.py: run by 2 gloo processes (CPU), and the same
models, data and optimizers in one process for comparison. Not collected by pytest."""
import os
import socket
import traceback
import warnings

import torch

import manifold_sgd as msgd

WORLD = 2
STEPS = 3
BATCH = 16  # global; each rank gets BATCH // WORLD


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlp():
    # widths chosen so Shard(0) splits unevenly (7 -> 4/3, 5 -> 3/2) and the head's one row
    # leaves rank 1 with an empty shard
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 5), torch.nn.Tanh(),
                               torch.nn.Linear(5, 1)).double()


def batch(step, rank=None):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH, 6, generator=g, dtype=torch.float64)
    y = torch.randn(BATCH, 1, generator=g, dtype=torch.float64)
    if rank is None:
        return x, y
    n = BATCH // WORLD
    return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


# (optimizer class, options): UN runs natively on local rows; FG-SGD groups span ranks
OPTIMIZERS = {
    "un": (msgd.UNSGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
    "fg_tensor": (msgd.FGSGD, dict(lr=0.1, momentum=0.9)),
    "fg_po_general": (msgd.FGSGD, dict(lr=0.1, momentum=0.5, grouping="PO", group_size=2,
                                       adaptive="general", curvature=0.5, distance=2.0)),
    "psi_fg": (msgd.PSISGD, dict(lr=0.1, momentum=0.9, adaptive="sphere", grouping="tensor")),
}
# ManifoldAdam: under DDP (every rank steps the whole, all-reduced gradient) and FSDP2 (each rank
# its own rows, no collective; the state sharded like the parameters)
ADAM_OPTIMIZERS = {
    "adam_row": (msgd.ManifoldAdam, dict(lr=0.01, weight_decay=0.01, second_moment="row")),
    "adam_element": (msgd.ManifoldAdam, dict(lr=0.01, weight_decay=0.01, second_moment="element")),
}


def train(model, opt, rank=None, steps=range(STEPS)):
    for step in steps:
        x, y = batch(step, rank)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def conv_start():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(5, 3, 3, 3, generator=g, dtype=torch.float64)
    grads = [torch.randn(5, 3, 3, 3, generator=g, dtype=torch.float64) for _ in range(STEPS)]
    return w, grads


CONV_OPT = (msgd.FGSGD, dict(lr=0.2, momentum=0.9, granularity="kernel", grouping="PIO", group_size=4))
# ManifoldAdam on kernel rows and 3 x 3 Stiefel blocks: several rows per dim-0 index, so a row
# exp_avg_sq is (d0, d1), sharded with the parameter
ADAM_CONV = {
    "adam_conv_sphere": dict(lr=0.05, granularity="kernel"),
    "adam_conv_stiefel": dict(lr=0.05, manifold="stiefel", granularity="kernel"),
    "adam_conv_element": dict(lr=0.05, granularity="kernel", second_moment="element"),
}

# stochastic rounding of bf16 tensors: a Shard(0) shard draws the unsharded tensor's bits.
# UN steps local rows natively (the 1-D tensor is Euclidean); FG-SGD's tensor groups span
# ranks and take the reference path, so the one-process run is the reference too.
SR_SHAPES = ((7, 5), (6, 3, 3, 3), (9,))
SR_OPTIMIZERS = {
    "un": (msgd.UNSGD, dict(lr=0.1, momentum=0.9), "auto"),
    "fg": (msgd.FGSGD, dict(lr=0.1, momentum=0.9), "reference"),
}


def sr_start():
    g = torch.Generator().manual_seed(11)
    ws = [torch.randn(s, generator=g).to(torch.bfloat16) for s in SR_SHAPES]
    grads = [[(torch.randn(s, generator=g) * 0.3).to(torch.bfloat16) for s in SR_SHAPES] for _ in range(STEPS)]
    return ws, grads


def single_process_results():
    out = {}
    for key, (cls, kw) in {**OPTIMIZERS, **ADAM_OPTIMIZERS}.items():
        model = mlp()
        train(model, cls(model.parameters(), **kw))
        out[key] = [p.detach().clone() for p in model.parameters()]
    w, grads = conv_start()
    p = w.clone().requires_grad_()
    opt = CONV_OPT[0]([p], **CONV_OPT[1])
    for g in grads:
        p.grad = g.clone()
        opt.step()
    out["conv_kernel"] = [p.detach().clone()]
    for key, kw in ADAM_CONV.items():
        p = w.clone().requires_grad_()
        opt = msgd.ManifoldAdam([p], **kw)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        out[key] = [p.detach().clone()]
    ws, grads = sr_start()
    for key, (cls, kw, backend) in SR_OPTIMIZERS.items():
        ps = [w.clone().requires_grad_() for w in ws]
        opt = cls(ps, stochastic_rounding=True, rounding_seed=3, backend=backend, **kw)
        for gs in grads:
            for q, g in zip(ps, gs):
                q.grad = g.clone()
            opt.step()
        out[f"sr/{key}"] = [q.detach().clone() for q in ps]
    return out


def _dcp_resumed(make_model, cls, kw, rank, path):
    """2 steps, a torch.distributed.checkpoint save of model + optimizer (get_state_dict), a new
    model and optimizer loaded from it (set_state_dict), then the last step: the parameters."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = make_model()
    opt = cls(model.parameters(), **kw)
    train(model, opt, rank, range(STEPS - 1))
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    model = make_model()
    opt = cls(model.parameters(), **kw)
    model_sd, optim_sd = get_state_dict(model, opt)
    loaded = {"model": model_sd, "optim": optim_sd}
    dcp.load(loaded, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    train(model, opt, rank, range(STEPS - 1, STEPS))
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def _scenarios(rank, mesh, outdir=None):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    for key, (cls, kw) in ADAM_OPTIMIZERS.items():
        model = mlp()
        train(DDP(model), cls(model.parameters(), **kw), rank)
        out[f"ddp/{key}"] = [p.detach().clone() for p in model.parameters()]
    def sharded_mlp():
        model = mlp()
        for layer in (model[0], model[2], model[4]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    for key, (cls, kw) in OPTIMIZERS.items():
        model = mlp()
        ddp = DDP(model)
        train(ddp, cls(model.parameters(), **kw), rank)
        out[f"ddp/{key}"] = [p.detach().clone() for p in model.parameters()]
    for key, (cls, kw) in {**OPTIMIZERS, **ADAM_OPTIMIZERS}.items():
        model = sharded_mlp()
        opt = cls(model.parameters(), **kw)
        train(model, opt, rank)
        out[f"fsdp/{key}"] = [p.full_tensor().detach().clone() for p in model.parameters()]
        out[f"fsdp/{key}/local_rows"] = [p.to_local().shape[0] for p in model.parameters()]
        # the state is sharded like the parameters (what distributed checkpointing expects)
        sd = opt.state_dict()
        bufs = [t for st in sd["state"].values() for k, t in st.items() if k in opt._math_state]
        out[f"fsdp/{key}/state_placements"] = sorted({str(tuple(b.placements)) for b in bufs})
        out[f"fsdp/{key}/state_shapes"] = [tuple(t.shape) for st in sd["state"].values()
                                           for k, t in sorted(st.items()) if k in opt._math_state]
        opt.load_state_dict(sd)
        # a checkpoint after 2 steps, loaded into a new optimizer, continues as the unbroken run
        model = sharded_mlp()
        first = cls(model.parameters(), **kw)
        train(model, first, rank, range(STEPS - 1))
        sd = first.state_dict()
        resumed = cls(model.parameters(), **kw)
        resumed.load_state_dict(sd)
        train(model, resumed, rank, range(STEPS - 1, STEPS))
        out[f"fsdp/{key}/resumed"] = [p.full_tensor().detach().clone() for p in model.parameters()]
        if outdir is not None:  # the same through torch.distributed.checkpoint (save, load into new objects)
            out[f"dcp/{key}"] = _dcp_resumed(sharded_mlp, cls, kw, rank, os.path.join(outdir, "dcp", key))

    # a conv weight with kernel rows ((out, in) pairs), sharded by hand, PIO groups across ranks
    w, grads = conv_start()
    p = torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)]))
    opt = CONV_OPT[0]([p], **CONV_OPT[1])
    for g in grads:
        p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
        opt.step()
    out["dtensor/conv_kernel"] = [p.full_tensor().detach().clone()]
    for key, kw in ADAM_CONV.items():
        p = torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)]))
        opt = msgd.ManifoldAdam([p], **kw)
        for g in grads:
            p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
            opt.step()
        v = opt.state[p]["exp_avg_sq"]
        out[f"dtensor/{key}"] = [p.full_tensor().detach().clone()]
        out[f"dtensor/{key}/v"] = (tuple(v.shape), str(tuple(v.placements)), tuple(v.to_local().shape))

    # bf16 Shard(0) tensors with stochastic rounding (made and gathered in float32: gloo and bf16)
    ws, grads = sr_start()
    for key, (cls, kw, _) in SR_OPTIMIZERS.items():
        ps = [torch.nn.Parameter(distribute_tensor(w.float(), mesh, [Shard(0)]).to(torch.bfloat16)) for w in ws]
        opt = cls(ps, stochastic_rounding=True, rounding_seed=3, **kw)
        for gs in grads:
            for q, g in zip(ps, gs):
                q.grad = distribute_tensor(g.float(), mesh, [Shard(0)]).to(torch.bfloat16)
            opt.step()
        out[f"sr/{key}"] = [q.detach().float().full_tensor().to(torch.bfloat16) for q in ps]

    # collectives issued by one step: one all_reduce for all adaptive tensors of a bucket, none
    # without adaptive groups
    import torch.distributed as dist

    calls = []
    real = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return real(tensor, *args, **kwargs)

    counts = {}
    for label, cls, kw in (("fg_po", msgd.FGSGD, dict(grouping="PO", group_size=2)),
                           ("un", msgd.UNSGD, {})):
        ps = [torch.nn.Parameter(distribute_tensor(torch.randn(s, dtype=torch.float64), mesh, [Shard(0)]))
              for s in ((5, 4), (6, 3, 3, 3), (3, 2))]
        opt = cls(ps, lr=0.1, momentum=0.9, **kw)
        for q in ps:
            q.grad = distribute_tensor(torch.randn(q.shape, dtype=torch.float64), mesh, [Shard(0)])
        dist.all_reduce = counting
        try:
            opt.step()
        finally:
            dist.all_reduce = real
        counts[label] = list(calls)
        calls.clear()
    out["collectives"] = counts

    # a non-finite gradient on rank 1's rows holds the whole (cross-rank) group on both ranks
    w0 = torch.randn(6, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    p = torch.nn.Parameter(distribute_tensor(w0.clone(), mesh, [Shard(0)]))
    opt = msgd.FGSGD([p], lr=0.1, grouping="tensor")
    before = p.to_local().detach().clone()
    g = torch.ones(6, 4, dtype=torch.float64)
    g[4, 1] = float("nan")
    p.grad = distribute_tensor(g, mesh, [Shard(0)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    out["nonfinite/held"] = bool(torch.equal(p.to_local().detach(), before))
    out["nonfinite/warned"] = [str(c.message) for c in caught if issubclass(c.category, RuntimeWarning)]
    out["nonfinite/skipped_rows"] = opt.skipped_rows

    # layouts that split rows: clear errors at construction, on every rank
    errors = {}
    for label, placements, kw in (("shard1", [Shard(1)], {}),
                                  ("tensor_rows", [Shard(0)], dict(granularity="tensor")),
                                  ("column_rows", [Shard(0)], dict(granularity="column"))):
        q = torch.nn.Parameter(distribute_tensor(w0.clone(), mesh, placements))
        try:
            msgd.UNSGD([q], lr=0.1, **kw)
            errors[label] = None
        except ValueError as exc:
            errors[label] = str(exc)
    q = torch.nn.Parameter(distribute_tensor(w0.clone(), mesh, [Shard(0)]))
    try:
        msgd.ManifoldAdam([q], lr=0.1, granularity="column")
        errors["adam_column_rows"] = None
    except ValueError as exc:
        errors["adam_column_rows"] = str(exc)
    out["errors"] = errors
    # a Euclidean tensor may be split any way (elementwise)
    q = torch.nn.Parameter(distribute_tensor(w0.clone(), mesh, [Shard(1)]))
    r = torch.nn.Parameter(distribute_tensor(w0.clone(), mesh, [Replicate()]))
    opt = msgd.ManifoldSGD([q, r], lr=0.1, manifold="euclidean", momentum=0.9, weight_decay=0.01)
    for _ in range(2):
        q.grad = distribute_tensor(g.nan_to_num(0.5), mesh, [Shard(1)])
        r.grad = distribute_tensor(g.nan_to_num(0.5), mesh, [Replicate()])
        opt.step()
    out["euclidean_shard1"] = [q.full_tensor().detach().clone(), r.full_tensor().detach().clone()]
    return out


def worker(rank, port, outdir):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        try:
            out = _scenarios(rank, mesh, outdir)
        except Exception:  # reported by the tests, with the rank
            out = {"traceback": traceback.format_exc()}
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
