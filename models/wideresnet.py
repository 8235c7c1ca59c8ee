"""WRN-28-2 exactly as the L2I authors' CIFAR-10 network (docs/models.md §1).

Deviations from the textbook WRN that the authors' code has, and that we keep for parity:
* every block convolution (3x3 and the 1x1 projection) has a bias;
* in the first block of stages 2 and 3 the BN + LeakyReLU output is computed and thrown away,
  so ``block{2,3}.layer.0.bn1.{weight,bias}`` never receive a gradient;
* BN momentum 0.001 (PyTorch convention; ``bn_momentum`` changes it, e.g. for a quick try).
A plain ``nn.Module``: the L2I meta step runs it through ``torch.func.functional_call``.
"""
import math

import torch.nn as nn
import torch.nn.functional as F

BN_MOMENTUM = 0.001
LEAKY_SLOPE = 0.1


class BasicBlock(nn.Module):
    def __init__(self, in_planes, out_planes, stride, activate_before_residual, bn_momentum):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes, momentum=bn_momentum)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(out_planes, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=True)
        self.equal_in_out = in_planes == out_planes
        self.shortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=True)
        self.activate_before_residual = activate_before_residual

    def forward(self, x):
        activated = F.leaky_relu(self.bn1(x), LEAKY_SLOPE)
        if self.equal_in_out:
            out = self.conv1(activated)
            residual = x
        elif self.activate_before_residual:
            out = self.conv1(activated)
            residual = self.shortcut(activated)
        else:
            # Authors' quirk: ``activated`` is discarded; both paths read the raw input.
            out = self.conv1(x)
            residual = self.shortcut(x)
        out = self.conv2(F.leaky_relu(self.bn2(out), LEAKY_SLOPE))
        return residual + out


class NetworkBlock(nn.Module):
    def __init__(self, n_blocks, in_planes, out_planes, stride, bn_momentum, activate_before_residual=False):
        super().__init__()
        self.layer = nn.Sequential(*[
            BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1,
                       activate_before_residual, bn_momentum)
            for i in range(n_blocks)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, num_classes=10, depth=28, widen_factor=2, bn_momentum=BN_MOMENTUM):
        super().__init__()
        assert (depth - 4) % 6 == 0, "WRN depth must be 6n+4"
        n_blocks = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n_blocks, widths[0], widths[1], 1, bn_momentum, activate_before_residual=True)
        self.block2 = NetworkBlock(n_blocks, widths[1], widths[2], 2, bn_momentum)
        self.block3 = NetworkBlock(n_blocks, widths[2], widths[3], 2, bn_momentum)
        self.bn1 = nn.BatchNorm2d(widths[3], momentum=bn_momentum)
        self.fc = nn.Linear(widths[3], num_classes)
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))  # biases keep PyTorch's default
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.leaky_relu(self.bn1(out), LEAKY_SLOPE)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # = 8x8 average pool on 32x32 inputs
        return self.fc(out)
