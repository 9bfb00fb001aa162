//! A model as a file, both ways (nn::saved): ptxgrad's checkpoints name their network and input
//! size; plain state_dicts (PyTorch's `save_file(net.state_dict())`, no metadata) are recognised
//! from their names and shapes, and what they cannot say is asked for by flag name.
mod common;
use std::collections::{BTreeMap, HashMap};

use common::{assert_mentions, err_msg, TempDir};
use ptxgrad::checkpoint::{self, NamedTensor};
use ptxgrad::nn::model::Model;
use ptxgrad::nn::models::{ALEXNET, ALL, LENET, NIN, VGG11};
use ptxgrad::nn::network::{describe_sizes, Network, MAX_FITTED_RESOLUTION};
use ptxgrad::nn::saved::{self, Expect, Source};
use ptxgrad::Device;

/// A state_dict of `net` at `resolution` with `meta` as its metadata (empty: as PyTorch writes).
fn write(
    dir: &TempDir,
    file: &str,
    net: &'static Network,
    resolution: usize,
    meta: &[(&str, &str)],
) -> std::path::PathBuf {
    let path = dir.join(file);
    let tensors = Model::new(net, resolution, 3, &Device::Cpu).unwrap().to_named().unwrap();
    let meta: BTreeMap<String, String> = meta.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    checkpoint::save(&path, &tensors, &meta).unwrap();
    path
}

fn shapes(net: &'static Network, resolution: usize) -> HashMap<String, Vec<usize>> {
    net.param_shapes(resolution).unwrap().into_iter().collect()
}

#[test]
fn the_input_sizes_a_state_dict_fits_come_from_its_shapes() {
    // AlexNet's first Linear takes 256 * 5 * 5 features where the last pool gives 5x5: conv1
    // gives 47 to 54 (the floor divisions of the strides), from inputs of 193 to 224.
    let alex = ALEXNET.fitting_resolutions(&shapes(&ALEXNET, 224));
    assert_eq!(alex, (193..=224).collect::<Vec<_>>());
    assert_eq!(describe_sizes(&alex), "193x193 to 224x224");
    // LeNet's 16 * 5 * 5: the second pool's floor takes 10 or 11, from 28 to 31.
    assert_eq!(LENET.fitting_resolutions(&shapes(&LENET, 28)), vec![28, 29, 30, 31]);
    // NiN's global pooling leaves its parameters independent of the input: every size fits.
    let nin = NIN.fitting_resolutions(&shapes(&NIN, 224));
    assert_eq!((nin[0], nin.len()), (NIN.min_resolution(), MAX_FITTED_RESOLUTION - NIN.min_resolution() + 1));
    assert_eq!(describe_sizes(&nin), format!("{0}x{0} up", NIN.min_resolution()));
    // Another network's names fit nothing.
    assert!(VGG11.fitting_resolutions(&shapes(&ALEXNET, 224)).is_empty());
    assert_eq!(describe_sizes(&[64, 80, 81]), "64x64, 80x80 to 81x81");
}

#[test]
fn a_plain_state_dict_of_every_network_loads_at_its_recipes_size() {
    let dir = TempDir::new("saved-plain");
    for net in ALL {
        let r = net.recipe.resolution;
        let path = write(&dir, &format!("{}.safetensors", net.name), net, r, &[]);
        let loaded = saved::load(&path, &Device::Cpu, Expect::default()).unwrap();
        assert_eq!((loaded.model.net.name, loaded.model.resolution, loaded.epoch()), (net.name, r, 0));
        let Source::StateDict { note } = &loaded.source else { panic!("{}: read as ptxgrad's", net.name) };
        assert_mentions(note, &["PyTorch state_dict", net.title, "found from its tensor names", &format!("{r}x{r}")]);
        // The tensors are the ones written.
        let want = Model::new(net, r, 3, &Device::Cpu).unwrap().to_named().unwrap();
        assert_eq!(loaded.model.to_named().unwrap(), want, "{}", net.name);
    }
}

#[test]
fn what_a_state_dict_cannot_say_is_asked_for_by_flag_name() {
    let dir = TempDir::new("saved-ask");
    // AlexNet trained at 65: its shapes fit 65 to 96 (one feature per channel into the first
    // Linear), the recipe's 224 not at all.
    let path = write(&dir, "a65.safetensors", &ALEXNET, 65, &[]);
    let msg = err_msg(saved::load(&path, &Device::Cpu, Expect::default()).map(|_| ()));
    assert_mentions(&msg, &[&path.display().to_string(), "give --resize", "65x65 to 96x96"]);
    let told = Expect { net: None, resolution: Some(70) };
    assert_eq!(saved::load(&path, &Device::Cpu, told).unwrap().model.resolution, 70);
    let wrong = Expect { net: None, resolution: Some(224) };
    let msg = err_msg(saved::load(&path, &Device::Cpu, wrong).map(|_| ()));
    assert_mentions(&msg, &["--resize 224", "`14.weight`", "expected shape [4096, 6400]", "found [4096, 256]"]);
    // --model names a network the tensors are not.
    let msg = err_msg(saved::load(&path, &Device::Cpu, Expect { net: Some(&VGG11), resolution: Some(65) }).map(|_| ()));
    assert_mentions(&msg, &["not the state_dict of VGG-11", "no tensor `0.0.weight`"]);
}

#[test]
fn tensors_of_no_network_are_refused_listing_the_networks() {
    let dir = TempDir::new("saved-foreign");
    let path = dir.join("foreign.safetensors");
    let t = NamedTensor::f32("encoder.weight", &[2, 2], vec![0.0; 4]);
    checkpoint::save(&path, &[t], &BTreeMap::new()).unwrap();
    let msg = err_msg(saved::load(&path, &Device::Cpu, Expect::default()).map(|_| ()));
    assert_mentions(&msg, &["no ptxgrad metadata", "encoder.weight", "lenet, alexnet, vgg11, nin"]);
}

#[test]
fn a_ptxgrad_checkpoint_names_its_network_and_size() {
    let dir = TempDir::new("saved-meta");
    let model = Model::new(&LENET, 28, 5, &Device::Cpu).unwrap();
    let (tensors, meta) = saved::contents(&model, 4, 5, 0.9, 256).unwrap();
    assert_eq!((meta["model"].as_str(), meta["resolution"].as_str(), meta["epoch"].as_str()), ("lenet", "28", "4"));
    let path = dir.join("lenet.safetensors");
    checkpoint::save(&path, &tensors, &meta).unwrap();
    let loaded = saved::load(&path, &Device::Cpu, Expect::default()).unwrap();
    assert_eq!((loaded.model.net.name, loaded.model.resolution, loaded.epoch()), ("lenet", 28, 4));
    let recorded = loaded.recorded();
    assert_eq!((recorded.seed, recorded.lr, recorded.batch_size), (Some(5), Some(0.9), Some(256)));
    assert_eq!(saved::recorded(&path).unwrap(), recorded);
    // --model must agree with it; --resize may pick another size its parameters fit, no other.
    let msg = err_msg(saved::load(&path, &Device::Cpu, Expect { net: Some(&ALEXNET), resolution: None }).map(|_| ()));
    assert_mentions(&msg, &["holds LeNet (`lenet`), but --model is alexnet"]);
    assert_eq!(
        saved::load(&path, &Device::Cpu, Expect { net: None, resolution: Some(29) }).unwrap().model.resolution,
        29
    );
    let msg = err_msg(saved::load(&path, &Device::Cpu, Expect { net: None, resolution: Some(36) }).map(|_| ()));
    assert_mentions(&msg, &["--resize 36", "trained at 28x28", "fit inputs of 28x28 to 31x31 only"]);
}

#[test]
fn a_checkpoint_without_a_model_name_is_alexnet() {
    // The format before networks were named: epoch and resolution, AlexNet's tensors.
    let dir = TempDir::new("saved-v1");
    let path = write(&dir, "v1.safetensors", &ALEXNET, 65, &[("epoch", "3"), ("resolution", "65")]);
    let loaded = saved::load(&path, &Device::Cpu, Expect::default()).unwrap();
    assert_eq!((loaded.model.net.name, loaded.model.resolution, loaded.epoch()), ("alexnet", 65, 3));
    assert!(matches!(loaded.source, Source::Ptxgrad { .. }));
    let bad = write(&dir, "bad.safetensors", &ALEXNET, 65, &[("epoch", "1"), ("resolution", "65"), ("model", "gpt")]);
    let msg = err_msg(saved::load(&bad, &Device::Cpu, Expect::default()).map(|_| ()));
    assert_mentions(&msg, &["metadata `model` is `gpt`"]);
}
