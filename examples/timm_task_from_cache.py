"""timm's own training pieces with the teacher read from a cache: timm's optimizer and scheduler factories and a
cached-teacher version of timm's LogitDistillationTask.

A loop written against timm's task changes two lines: the task is built without a teacher model, and each call
passes the batch's teacher outputs (timm would run the teacher on the batch instead):

    timm:  task = LogitDistillationTask(student, teacher_model="resnet50", ...);  out = task(x, target)
    here:  task = CachedLogitDistillationTask(student, ...);                        out = task(x, target, batch.teachers[teacher])

    python examples/timm_task_from_cache.py --store runs/digits --epochs 3
"""

import argparse

import timm
import torch
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from stages.loader import normalize, open_cache
from stages.timm_tasks import CachedLogitDistillationTask

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--store", required=True, help="a store made by `pipeline extract`")
p.add_argument("--teacher", help="the cached teacher's id (default: the store's first)")
p.add_argument("--student", default="resnet10t")
p.add_argument("--epochs", type=int, default=3)
p.add_argument("--batch-size", type=int, default=64)
p.add_argument("--opt", default="lamb", help="any optimizer of timm's create_optimizer_v2")
p.add_argument("--lr", type=float, default=4e-3)
p.add_argument("--temperature", type=float, default=4.0)
p.add_argument("--workers", type=int, default=0, help="loader processes rendering views")
p.add_argument("--out", default="student.pt")
args = p.parse_args()
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
torch.manual_seed(0)

cache = open_cache(args.store)
teacher = args.teacher or cache.teacher_ids[0]
loader = cache.loader(
    args.batch_size, teachers=[teacher], needs=["logits"], temperature=args.temperature, workers=args.workers
)

student = timm.create_model(args.student, pretrained=False, num_classes=cache.num_classes)
mean, std = student.pretrained_cfg["mean"], student.pretrained_cfg["std"]
# Mixed views come with mixed target rows, so the label term is timm's soft-target cross-entropy, as with Mixup.
task = CachedLogitDistillationTask(
    student,
    criterion=SoftTargetCrossEntropy(),
    task_loss_weight=0.5,
    temperature=args.temperature,
    device=device,
    verbose=False,
).to(device)
optimizer = create_optimizer_v2(task.trainable_module, opt=args.opt, lr=args.lr, weight_decay=0.02)
scheduler, epochs = create_scheduler_v2(
    optimizer,
    sched="cosine",
    num_epochs=args.epochs,
    warmup_epochs=1,
    step_on_epochs=False,
    updates_per_epoch=len(loader),
)

updates = 0
for epoch in range(epochs):
    loader.set_epoch(epoch)
    task.train()
    sums = {"loss": 0.0, "task_loss": 0.0, "kd_loss": 0.0}
    for batch in loader:
        batch = batch.to(device, non_blocking=True)
        out = task(normalize(batch.images, mean, std), batch.targets.soft, batch.teachers[teacher])
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        updates += 1
        scheduler.step_update(num_updates=updates)
        for k in sums:
            sums[k] += out[k].item()
    scheduler.step(epoch + 1)
    print(
        f"epoch {epoch + 1}: "
        + ", ".join(f"{k} {v / len(loader):.4f}" for k, v in sums.items())
        + f", lr {optimizer.param_groups[0]['lr']:.2e}"
    )

torch.save({"model": student.state_dict()}, args.out)
print(f"saved {args.out}")
