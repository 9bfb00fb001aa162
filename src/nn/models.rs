//! The book's CNNs (d2l chapters 7-8) as layer tables, each with its recipe, for 1-channel
//! 28x28 Fashion-MNIST images and 10 classes. The tables mirror `../shared/peer/torch_d2l.py`
//! module for module, so that the parameter names and shapes match PyTorch's `state_dict`.

use crate::error::{Error, Result};
use crate::nn::network::{Layer, Network, Recipe};

use Layer::{Conv2d, Dropout, Flatten, Linear, MaxPool2d, Relu, Seq};

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
        MaxPool2d { kernel: 3, stride: 2 },
        Conv2d { out: 256, kernel: 5, stride: 1, pad: 2 },
        Relu,
        MaxPool2d { kernel: 3, stride: 2 },
        Conv2d { out: 384, kernel: 3, stride: 1, pad: 1 },
        Relu,
        Conv2d { out: 384, kernel: 3, stride: 1, pad: 1 },
        Relu,
        Conv2d { out: 256, kernel: 3, stride: 1, pad: 1 },
        Relu,
        MaxPool2d { kernel: 3, stride: 2 },
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
        Seq(&[$(Conv2d { out: $out, kernel: 3, stride: 1, pad: 1 }, Relu,)+ MaxPool2d { kernel: 2, stride: 2 }])
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
        MaxPool2d { kernel: 3, stride: 2 },
        nin_block!(256, 5, 1, 2),
        MaxPool2d { kernel: 3, stride: 2 },
        nin_block!(384, 3, 1, 1),
        MaxPool2d { kernel: 3, stride: 2 },
        Dropout { p: 0.5 },
        nin_block!(10, 3, 1, 1),
        Layer::GlobalAvgPool2d,
        Flatten,
    ],
    in_channels: 1,
    classes: 10,
    recipe: Recipe { lr: 0.1, batch_size: 128, resolution: 224 },
};

/// Every network `--model` names, in the book's order.
pub static ALL: [&Network; 4] = [&LENET, &ALEXNET, &VGG11, &NIN];

/// The network called `name`, or an error listing the names there are.
pub fn by_name(name: &str) -> Result<&'static Network> {
    ALL.iter().copied().find(|n| n.name == name).ok_or_else(|| {
        let names: Vec<&str> = ALL.iter().map(|n| n.name).collect();
        Error::Invalid(format!("--model: expected one of {}, found `{name}`", names.join(", ")))
    })
}
