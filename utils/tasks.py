"""What differs between the two tasks, gathered in one small object per dataset (docs/method.md §2.7).

A training script's ``train_step`` is written once; it asks the task for the supervised loss, the
consistency loss, how a network output on view 2 becomes an imputed label (softmax for classes;
shift-compensated normalised coordinates for landmarks, docs/method.md §2.5), and the task's defaults.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader

from utils.errors import UserError
from utils.interleave import interleaved_forward
from utils.metrics import top1_accuracy


@dataclass
class Batch:
    x_l: torch.Tensor                # labeled images
    y_l: torch.Tensor                # their targets in loss space (one-hot / normalised coordinates)
    u1: Optional[torch.Tensor] = None   # unlabeled images, view 1 (trained on); None for SL
    u2: Optional[torch.Tensor] = None   # the same images, view 2 (labels imputed on it)
    shift: Optional[tuple] = None    # AFLW view offsets (dx1, dy1, dx2, dy2)
    x_m: Optional[torch.Tensor] = None  # L2I meta batch, drawn from the labeled set
    y_m: Optional[torch.Tensor] = None


def full_precision(x):
    """bf16/fp16 outputs of ``--amp`` as fp32 for losses and metrics; fp32 and fp64 pass unchanged."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def _loader(dataset, args, device, **sampling):
    """A DataLoader with the run's worker processes; on CUDA it pins its batches in page-locked memory, so
    that the copies to the GPU (``non_blocking``) overlap with computation."""
    return DataLoader(dataset, num_workers=args.workers, pin_memory=device.type == "cuda", **sampling)


def _to(device, *tensors):
    return [t.to(device, non_blocking=True) for t in tensors]


def _sum_by_batch(model, loader, device, per_batch):
    """Run ``model`` in eval mode over ``loader``; ``per_batch`` returns summed quantities of a batch."""
    was_training = model.training
    model.eval()
    totals, count = None, 0
    with torch.no_grad():
        for inputs, targets in loader:
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            sums = per_batch(full_precision(model(inputs)), targets)
            totals = sums if totals is None else [a + b for a, b in zip(totals, sums)]
            count += len(inputs)
    model.train(was_training)
    return [t / count for t in totals]


class _Task:
    def build_student(self, args, device):
        """The task's network on ``device`` in train mode; channels-last with ``--channels-last`` (the
        convolutions then keep their activations channels-last too)."""
        model = self.build_model(args).to(device).train()
        return model.to(memory_format=torch.channels_last) if args.channels_last else model


class Cifar10Task(_Task):
    name = "cifar10"
    train_stats_on_student = False   # "Train Stats" evaluate the reported model (docs/evaluation.md §1)

    def load(self, args):
        from dataset.cifar10 import load_cifar10
        self.data = load_cifar10(args.data_root, args.n_labeled, args.n_val)
        return self.data

    def to(self, device):
        self.device = device  # where --data-on-device keeps the images

    def build_model(self, args):
        from models.wideresnet import WideResNet
        return WideResNet(num_classes=10, bn_momentum=args.bn_momentum)

    def make_optimizer(self, params, args):
        return torch.optim.Adam(params, lr=args.lr)

    def lr_at(self, epoch, args):
        return args.lr  # constant (docs/defaults.md §1)

    def ramp_progress(self, epoch, iteration, step, args):
        return epoch + iteration / args.val_iteration  # fractional epochs

    def train_loader(self, dataset, args):
        """An epoch's ``--val-iteration`` training batches, pass after pass over fresh permutations (the
        authors' restarted shuffled loader without the restarts, ``dataset.cifar10.EndlessShuffle``)."""
        from dataset.cifar10 import DeviceBatches, EndlessShuffle
        self._check_batch_size(dataset, args)
        if args.data_on_device:
            return DeviceBatches(dataset, args.batch_size, self.device, batches=args.val_iteration)
        return _loader(dataset, args, self.device,
                       batch_sampler=EndlessShuffle(len(dataset), args.batch_size, args.val_iteration))

    def train_stats_loader(self, dataset, args):
        """One shuffled, drop-last pass over the labeled images, the authors' "Train Stats" (docs/evaluation.md §1)."""
        from dataset.cifar10 import DeviceBatches
        self._check_batch_size(dataset, args)
        if args.data_on_device:
            return DeviceBatches(dataset, args.batch_size, self.device)
        return _loader(dataset, args, self.device, batch_size=args.batch_size, shuffle=True, drop_last=True)

    @staticmethod
    def _check_batch_size(dataset, args):
        if len(dataset) < args.batch_size:
            raise UserError(f"--batch-size {args.batch_size} is larger than the {len(dataset)} images it is drawn "
                            f"from; lower --batch-size or raise --n-labeled")

    def eval_loader(self, dataset, args):
        return _loader(dataset, args, self.device, batch_size=args.batch_size, shuffle=False)

    def make_batch(self, labeled, unlabeled, meta, device):
        x_l, y_l = _to(device, *labeled)
        batch = Batch(x_l=x_l, y_l=self.one_hot(y_l))
        if unlabeled is not None:
            (u1, u2), _ = unlabeled
            batch.u1, batch.u2 = _to(device, u1, u2)
        if meta is not None:
            x_m, y_m = _to(device, *meta)
            batch.x_m, batch.y_m = x_m, self.one_hot(y_m)
        return batch

    @staticmethod
    def one_hot(labels):
        return F.one_hot(labels, 10).float()

    # --- the losses and label imputation every train_step uses ---
    def supervised_loss(self, logits, targets):
        """Soft cross-entropy averaged over the batch."""
        return -(targets * F.log_softmax(full_precision(logits), dim=1)).sum(dim=1).mean()

    def prediction(self, logits):
        return torch.softmax(full_precision(logits), dim=1)

    def impute(self, logits_view2, batch):
        """A network output on view 2 as a label for view 1: class probabilities."""
        return torch.softmax(full_precision(logits_view2), dim=1)

    def consistency_loss(self, student_out, target):
        return F.mse_loss(self.prediction(student_out), target)  # mean over B×10

    def student_forward(self, model, x_l, u1):
        """Labeled and view-1 outputs through the 2-way BN interleave (docs/method.md §2.3)."""
        return interleaved_forward(model, [x_l, u1])

    def evaluate(self, model, loader, device):
        def per_batch(logits, labels):
            n = len(labels)
            return [F.cross_entropy(logits, labels) * n, (top1_accuracy(logits, labels) * n).float()]
        loss, acc = _sum_by_batch(model, loader, device, per_batch)
        return {"loss": loss.item(), "acc": acc.item()}


class AflwTask(_Task):
    name = "aflw"
    train_stats_on_student = True    # docs/evaluation.md §2: "Train Stats" always on the student
    lr_decay_every = 100             # ×0.1 when (epoch + 1) is a multiple of 100 (docs/method.md §4.6)

    def load(self, args):
        from dataset.aflw import load_aflw
        self.data = load_aflw(args.data_root, args.n_labeled)
        return self.data

    def to(self, device):
        self.device = device
        self.mean, self.std = self.data.target_mean.to(device), self.data.target_std.to(device)

    def build_model(self, args):
        from models.tcdcnn import TCDCNN
        return TCDCNN()

    def make_optimizer(self, params, args):
        return torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=5e-4)

    def lr_at(self, epoch, args):
        return args.lr * 0.1 ** ((epoch + 1) // self.lr_decay_every)

    def ramp_progress(self, epoch, iteration, step, args):
        return step  # global iterations, read before the step counter advances

    def train_loader(self, dataset, args):
        from dataset.aflw import RepeatPermutationSampler
        sampler = RepeatPermutationSampler(len(dataset), args.val_iteration * args.batch_size)
        return _loader(dataset, args, self.device,
                       batch_sampler=BatchSampler(sampler, args.batch_size, drop_last=True))

    def train_stats_loader(self, dataset, args):
        """"Train Stats" (docs/evaluation.md §2): the ``--val-iteration`` batches of a training epoch."""
        return self.train_loader(dataset, args)

    def eval_loader(self, dataset, args):
        return _loader(dataset, args, self.device, batch_size=args.batch_size, shuffle=False)

    def make_batch(self, labeled, unlabeled, meta, device):
        from utils.landmarks import normalise
        x_l, y_l = _to(device, *labeled)
        batch = Batch(x_l=x_l, y_l=normalise(y_l, self.mean, self.std))
        if unlabeled is not None:
            u1, dx1, dy1, u2, dx2, dy2 = _to(device, *unlabeled)
            batch.u1, batch.u2, batch.shift = u1, u2, (dx1, dy1, dx2, dy2)
        if meta is not None:
            x_m, y_m = _to(device, *meta)
            batch.x_m, batch.y_m = x_m, normalise(y_m, self.mean, self.std)
        return batch

    def supervised_loss(self, outputs, targets):
        return F.mse_loss(full_precision(outputs), targets)

    def prediction(self, outputs):
        return outputs

    def impute(self, outputs_view2, batch):
        """A view-2 prediction as a view-1 label: shift compensation S (docs/method.md §2.5), differentiable.

        In fp32 whatever the output's dtype: S passes through pixel coordinates of about 30 px, which bf16
        (``--amp``) would round to 0.125 px."""
        from utils.landmarks import shift_compensate
        return shift_compensate(full_precision(outputs_view2), *batch.shift, self.mean, self.std)

    def consistency_loss(self, student_out, target):
        return F.mse_loss(full_precision(student_out), target)

    def student_forward(self, model, x_l, u1):
        """TCDCNN has no batch-dependent layer: one forward over both (the authors' regression
        interleave has no numerical effect, docs/method.md §2.3)."""
        out = model(torch.cat([x_l, u1]))
        return out[:len(x_l)], out[len(x_l):]

    def evaluate(self, model, loader, device):
        from utils.landmarks import denormalise, error_and_failure_sums

        def per_batch(outputs, targets):
            pred = denormalise(outputs, self.mean, self.std)
            return [F.mse_loss(pred, targets) * len(targets), *error_and_failure_sums(pred, targets)]
        loss, me, fr = _sum_by_batch(model, loader, device, per_batch)
        return {"loss": loss.item(), "me": me.item(), "fr": fr.item()}


TASKS = {"cifar10": Cifar10Task, "aflw": AflwTask}
