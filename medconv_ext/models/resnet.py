"""ResNet18 (the package's own, no torchvision dependency) and its rolling version."""
from torch import nn

from ._util import record_builder_spec
from .rollify import rollify


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet with BasicBlocks (He et al. 2016), the torchvision layout and module names:
    7x7 stride-2 stem, 3x3 max-pool, four stages (widths features * 1, 2, 4, 8), global average
    pool, linear classifier. Returns logits."""

    def __init__(self, layers=(2, 2, 2, 2), num_classes: int = 1000, in_channels: int = 3, features: int = 64):
        super().__init__()
        for name, v in (("num_classes", num_classes), ("in_channels", in_channels), ("features", features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError("ResNet: %s must be a positive int, got %r" % (name, v))
        self.conv1 = nn.Conv2d(in_channels, features, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(features)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        planes, stages = features, []
        in_planes = features
        for i, n in enumerate(layers):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride=2 if (i > 0 and j == 0) else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
            planes *= 2
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        record_builder_spec(self, "medconv_ext.models:ResNet", layers=list(layers), num_classes=num_classes,
                            in_channels=in_channels, features=features)

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError("ResNet: expected a 4D input (N, C, H, W), got shape %s" % (tuple(x.shape),))
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def resnet18(num_classes: int = 1000, in_channels: int = 3, features: int = 64) -> ResNet:
    """Dense ResNet18 (11,689,512 parameters for 1000 classes, 11,177,538 for 2)."""
    return record_builder_spec(ResNet((2, 2, 2, 2), num_classes, in_channels, features), "resnet18",
                               num_classes=num_classes, in_channels=in_channels, features=features)


def rolling_resnet18(num_classes: int = 2, in_channels: int = 3, features: int = 64) -> ResNet:
    """ResNet18 converted by rollify(): every 3x3 conv becomes a rolling conv without bias
    (n_base = ceil(out / in): double rolls where a stage doubles the width, single rolls elsewhere);
    the 7x7 stem, the 1x1 shortcut convs and the classifier stay dense. 226,626 parameters for
    2 classes."""
    model = resnet18(num_classes, in_channels, features)
    rollify(model, keep_first=True, min_kernel=2, bias=False)
    return record_builder_spec(model, "rolling_resnet18", num_classes=num_classes, in_channels=in_channels,
                               features=features)
