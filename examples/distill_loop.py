"""Distil a student from a teacher cache in a plain PyTorch loop: the public loader and the project's losses.

The store is one `pipeline extract` wrote; the loader replays its views (crops, flips, RandAugment, mixing) and
hands each batch with its cached teacher logits, so the teacher never runs. One process, or one per GPU:

    python examples/distill_loop.py --store runs/digits --epochs 3
    torchrun --standalone --nproc_per_node 2 examples/distill_loop.py --store runs/digits   # DDP: NCCL on GPUs, gloo on CPUs
"""

import argparse
import os

import timm
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from stages.loader import normalize, open_cache
from stages.methods.losses import kd_loss

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--store", required=True, help="a store made by `pipeline extract`")
p.add_argument("--teacher", help="the cached teacher's id (default: the store's first)")
p.add_argument("--student", default="resnet10t")
p.add_argument("--epochs", type=int, default=3)
p.add_argument("--batch-size", type=int, default=64, help="per process")
p.add_argument("--lr", type=float, default=2e-3)
p.add_argument("--temperature", type=float, default=1.0)
p.add_argument("--alpha", type=float, default=0.5, help="weight of the label term; 1 - alpha weighs KD")
p.add_argument("--workers", type=int, default=0, help="loader processes rendering views")
p.add_argument("--out", default="student.pt")
args = p.parse_args()

# Under torchrun each process is one rank; the loader reads its rank and world from torch.distributed.
distributed = "WORLD_SIZE" in os.environ
if distributed:
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
rank = dist.get_rank() if distributed else 0
device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
torch.manual_seed(0)  # every rank starts from the same student (DDP also broadcasts rank 0's weights)

cache = open_cache(args.store)
teacher = args.teacher or cache.teacher_ids[0]
# The top-k logits a store keeps are rebuilt for the temperature the loss uses.
loader = cache.loader(
    args.batch_size,
    teachers=[teacher],
    needs=["logits"],
    temperature=args.temperature,
    label_smoothing=0.1,
    workers=args.workers,
)

student = timm.create_model(args.student, pretrained=False, num_classes=cache.num_classes).to(device)
mean, std = student.pretrained_cfg["mean"], student.pretrained_cfg["std"]
model = DistributedDataParallel(student) if distributed else student
optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.epochs * len(loader))

for epoch in range(args.epochs):
    loader.set_epoch(epoch)  # a new order and new stored views each epoch
    model.train()
    loss_sum, agree = torch.zeros((), device=device), torch.zeros((), device=device)
    for batch in loader:
        batch = batch.to(device, non_blocking=True)
        logits = model(normalize(batch.images, mean, std))  # uint8 -> float32 on the device
        t_logits = batch.teachers[teacher]["logits"]
        # The label term on the mixed, smoothed targets (a mixed view's target is mixed too), KD on the cached teacher.
        ce = torch.sum(-batch.targets.soft * logits.log_softmax(1), dim=1).mean()
        loss = args.alpha * ce + (1 - args.alpha) * kd_loss(logits, t_logits, args.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach()
        agree += (logits.argmax(1) == t_logits.argmax(1)).float().mean().detach()
    if distributed:  # the mean over every rank's steps
        for t in (loss_sum, agree):
            dist.all_reduce(t)
    world = dist.get_world_size() if distributed else 1
    if rank == 0:
        print(
            f"epoch {epoch + 1}: loss {loss_sum.item() / (len(loader) * world):.4f}, "
            f"top-1 agreement with the teacher {agree.item() / (len(loader) * world):.3f} "
            f"({len(loader)} steps of {args.batch_size} views on each of {world} rank(s))"
        )

if rank == 0:
    torch.save({"model": student.state_dict(), "epoch": args.epochs, "loader": loader.state_dict()}, args.out)
    print(f"saved {args.out}")
if distributed:
    dist.destroy_process_group()
