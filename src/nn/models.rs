//! The book's CNNs (d2l chapters 7-8) as layer tables, each with its recipe, for 1-channel
//! 28x28 Fashion-MNIST images and 10 classes. The tables mirror `../shared/peer/torch_d2l.py`
//! module for module, so that the parameter names and shapes match PyTorch's `state_dict`.

use crate::error::{Error, Result};
use crate::nn::network::{Layer, Network, Recipe};

use Layer::{BatchNorm2d, Conv2d, Dropout, Flatten, Inception, Linear, MaxPool2d, Relu, Residual, Seq};

/// LeNet-5 (§7.6): sigmoid activations and average pooling, on the 28x28 images as they are.
pub static LENET: Network = Network {
    name: "lenet",
    title: "LeNet",
    layers: &[
        Conv2d { out: 6, kernel: 5, stride: 1, pad: 2 },
        Layer::Sigmoid,
        Layer::AvgPool2d { kernel: 2, stride: 2 },
        Conv2d { out: 16, kernel: 5, stride: 1, pad: 0 },
        Layer::Sigmoid,
        Layer::AvgPool2d { kernel: 2, stride: 2 },
        Flatten,
        Linear { out: 120 },
        Layer::Sigmoid,
        Linear { out: 84 },
        Layer::Sigmoid,
        Linear { out: 10 },
    ],
    in_channels: 1,
    classes: 10,
    recipe: Recipe { lr: 0.9, batch_size: 256, resolution: 28 },
};

/// AlexNet (§8.1).
pub static ALEXNET: Network = Network {
    name: "alexnet",
    title: "AlexNet",
    layers: &[
        Conv2d { out: 96, kernel: 11, stride: 4, pad: 1 },
        Relu,
        MaxPool2d { kernel: 3, stride: 2, pad: 0 },
        Conv2d { out: 256, kernel: 5, stride: 1, pad: 2 },
        Relu,
        MaxPool2d { kernel: 3, stride: 2, pad: 0 },
        Conv2d { out: 384, kernel: 3, stride: 1, pad: 1 },
        Relu,
        Conv2d { out: 384, kernel: 3, stride: 1, pad: 1 },
        Relu,
        Conv2d { out: 256, kernel: 3, stride: 1, pad: 1 },
        Relu,
        MaxPool2d { kernel: 3, stride: 2, pad: 0 },
        Flatten,
        Linear { out: 4096 },
        Relu,
        Dropout { p: 0.5 },
        Linear { out: 4096 },
        Relu,
        Dropout { p: 0.5 },
        Linear { out: 10 },
    ],
    in_channels: 1,
    classes: 10,
    recipe: Recipe { lr: 0.01, batch_size: 128, resolution: 224 },
};

/// A VGG block (§8.2) of 3x3 convolutions with padding 1, then a 2x2 max-pool.
macro_rules! vgg_block {
    ($($out:expr),+) => {
        Seq(&[$(Conv2d { out: $out, kernel: 3, stride: 1, pad: 1 }, Relu,)+ MaxPool2d { kernel: 2, stride: 2, pad: 0 }])
    };
}

/// VGG-11 (§8.2) with the book's channel counts divided by 4 (its `small_conv_arch`).
pub static VGG11: Network = Network {
    name: "vgg11",
    title: "VGG-11",
    layers: &[
        vgg_block!(16),
        vgg_block!(32),
        vgg_block!(64, 64),
        vgg_block!(128, 128),
        vgg_block!(128, 128),
        Flatten,
        Linear { out: 4096 },
        Relu,
        Dropout { p: 0.5 },
        Linear { out: 4096 },
        Relu,
        Dropout { p: 0.5 },
        Linear { out: 10 },
    ],
    in_channels: 1,
    classes: 10,
    recipe: Recipe { lr: 0.05, batch_size: 128, resolution: 224 },
};

/// A NiN block (§8.3): a convolution, then two 1x1 convolutions, each with a ReLU.
macro_rules! nin_block {
    ($out:expr, $kernel:expr, $stride:expr, $pad:expr) => {
        Seq(&[
            Conv2d { out: $out, kernel: $kernel, stride: $stride, pad: $pad },
            Relu,
            Conv2d { out: $out, kernel: 1, stride: 1, pad: 0 },
            Relu,
            Conv2d { out: $out, kernel: 1, stride: 1, pad: 0 },
            Relu,
        ])
    };
}

/// Network in Network (§8.3): no dense layers; the last block has one channel per class and a
/// global average pool makes them the logits.
pub static NIN: Network = Network {
    name: "nin",
    title: "NiN",
    layers: &[
        nin_block!(96, 11, 4, 0),
        MaxPool2d { kernel: 3, stride: 2, pad: 0 },
        nin_block!(256, 5, 1, 2),
        MaxPool2d { kernel: 3, stride: 2, pad: 0 },
        nin_block!(384, 3, 1, 1),
        MaxPool2d { kernel: 3, stride: 2, pad: 0 },
        Dropout { p: 0.5 },
        nin_block!(10, 3, 1, 1),
        Layer::GlobalAvgPool2d,
        Flatten,
    ],
    in_channels: 1,
    classes: 10,
    recipe: Recipe { lr: 0.1, batch_size: 128, resolution: 224 },
};

/// GoogLeNet (§8.4): a stem of convolutions, nine Inception blocks in three stages with padded
/// max-pools between them, a global average pool and one linear layer.
pub static GOOGLENET: Network = Network {
    name: "googlenet",
    title: "GoogLeNet",
    layers: &[
        Seq(&[Conv2d { out: 64, kernel: 7, stride: 2, pad: 3 }, Relu, MaxPool2d { kernel: 3, stride: 2, pad: 1 }]),
        Seq(&[
            Conv2d { out: 64, kernel: 1, stride: 1, pad: 0 },
            Relu,
            Conv2d { out: 192, kernel: 3, stride: 1, pad: 1 },
            Relu,
            MaxPool2d { kernel: 3, stride: 2, pad: 1 },
        ]),
        Seq(&[
            Inception { c1: 64, c2: (96, 128), c3: (16, 32), c4: 32 },
            Inception { c1: 128, c2: (128, 192), c3: (32, 96), c4: 64 },
            MaxPool2d { kernel: 3, stride: 2, pad: 1 },
        ]),
        Seq(&[
            Inception { c1: 192, c2: (96, 208), c3: (16, 48), c4: 64 },
            Inception { c1: 160, c2: (112, 224), c3: (24, 64), c4: 64 },
            Inception { c1: 128, c2: (128, 256), c3: (24, 64), c4: 64 },
            Inception { c1: 112, c2: (144, 288), c3: (32, 64), c4: 64 },
            Inception { c1: 256, c2: (160, 320), c3: (32, 128), c4: 128 },
            MaxPool2d { kernel: 3, stride: 2, pad: 1 },
        ]),
        Seq(&[
            Inception { c1: 256, c2: (160, 320), c3: (32, 128), c4: 128 },
            Inception { c1: 384, c2: (192, 384), c3: (48, 128), c4: 128 },
            Layer::GlobalAvgPool2d,
            Flatten,
        ]),
        Linear { out: 10 },
    ],
    in_channels: 1,
    classes: 10,
    recipe: Recipe { lr: 0.1, batch_size: 128, resolution: 96 },
};

/// A ResNet stage (§8.6): two residual blocks; the first halves the size and changes the
/// channels through a 1x1 conv on its shortcut, except in the first stage.
macro_rules! resnet_stage {
    ($out:expr, first) => {
        Seq(&[Residual { out: $out, conv1x1: false, stride: 1 }, Residual { out: $out, conv1x1: false, stride: 1 }])
    };
    ($out:expr) => {
        Seq(&[Residual { out: $out, conv1x1: true, stride: 2 }, Residual { out: $out, conv1x1: false, stride: 1 }])
    };
}

/// ResNet-18 (§8.6): a stem with batch norm, four stages of two residual blocks, a global average
/// pool and one linear layer.
pub static RESNET18: Network = Network {
    name: "resnet18",
    title: "ResNet-18",
    layers: &[
        Seq(&[
            Conv2d { out: 64, kernel: 7, stride: 2, pad: 3 },
            BatchNorm2d,
            Relu,
            MaxPool2d { kernel: 3, stride: 2, pad: 1 },
        ]),
        resnet_stage!(64, first),
        resnet_stage!(128),
        resnet_stage!(256),
        resnet_stage!(512),
        Layer::GlobalAvgPool2d,
        Flatten,
        Linear { out: 10 },
    ],
    in_channels: 1,
    classes: 10,
    recipe: Recipe { lr: 0.05, batch_size: 256, resolution: 96 },
};

/// Every network `--model` names, in the book's order.
pub static ALL: [&Network; 6] = [&LENET, &ALEXNET, &VGG11, &NIN, &GOOGLENET, &RESNET18];

/// The network called `name`, or an error listing the names there are.
pub fn by_name(name: &str) -> Result<&'static Network> {
    ALL.iter().copied().find(|n| n.name == name).ok_or_else(|| {
        let names: Vec<&str> = ALL.iter().map(|n| n.name).collect();
        Error::Invalid(format!("--model: expected one of {}, found `{name}`", names.join(", ")))
    })
}
