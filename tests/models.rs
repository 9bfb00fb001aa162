//! Every network table against PyTorch's own account of the model (tests/data/peer: the
//! peer's `names` and `shapes` output): the same `state_dict` names and shapes in the same order,
//! the same output shape after each top-level block, the same parameter count.

use std::path::PathBuf;

use ptxgrad::nn::models::{self, ALL};
use ptxgrad::nn::network::{Network, StateKind};
use serde_json::Value;

fn peer(model: &str, what: &str) -> Vec<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/data/peer/{model}.{what}.jsonl"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", path.display()))).collect()
}

fn dims(v: &Value) -> Vec<usize> {
    v.as_array().expect("a shape").iter().map(|d| d.as_u64().expect("a dim") as usize).collect()
}

#[test]
fn parameter_names_and_shapes_are_pytorchs() {
    for net in ALL {
        let want: Vec<(String, Vec<usize>, String)> = peer(net.name, "names")
            .iter()
            .map(|t| {
                let dtype = t["dtype"].as_str().expect("a dtype").to_string();
                (t["name"].as_str().expect("a name").to_string(), dims(&t["shape"]), dtype)
            })
            .collect();
        let got: Vec<(String, Vec<usize>, String)> = net
            .state_shapes(net.recipe.resolution)
            .unwrap()
            .into_iter()
            .map(|e| {
                let dtype = if e.kind == StateKind::Count { "int64" } else { "float32" };
                (e.name, e.shape, dtype.to_string())
            })
            .collect();
        assert_eq!(got, want, "{}", net.name);
    }
}

#[test]
fn block_outputs_and_parameter_counts_are_pytorchs() {
    for net in ALL {
        let lines = peer(net.name, "shapes");
        let (blocks, count) = lines.split_at(lines.len() - 1);
        let want_count = count[0]["parameters"].as_u64().expect("a count");
        assert_eq!(net.param_elements(net.recipe.resolution).unwrap(), want_count, "{}", net.name);
        let summary = net.summary(net.recipe.resolution).unwrap();
        let rows: Vec<&str> = summary.lines().collect();
        assert_eq!(rows.len(), blocks.len() + 1, "{}: {summary}", net.name);
        for (row, b) in rows.iter().zip(blocks) {
            let shape: Vec<String> = dims(&b["output"]).iter().map(|d| d.to_string()).collect();
            let layer = b["layer"].as_str().expect("a layer name");
            assert!(row.starts_with(layer), "{}: `{row}` is not a {layer}", net.name);
            assert!(
                row.ends_with(&format!("torch.Size([{}])", shape.join(", "))),
                "{}: `{row}` vs {shape:?}",
                net.name
            );
        }
    }
}

#[test]
fn the_issue_counts() {
    // The parameter counts the book's recipes give, as PyTorch counts them.
    let count = |n: &Network| n.param_elements(n.recipe.resolution).unwrap();
    assert_eq!(count(&models::LENET), 61_706);
    assert_eq!(count(&models::VGG11), 43_093_322);
    assert_eq!(count(&models::NIN), 1_992_166);
    assert_eq!(count(&models::ALEXNET), 46_764_746);
    assert_eq!(count(&models::GOOGLENET), 5_977_530);
    assert_eq!(count(&models::RESNET18), 11_178_378);
}

#[test]
fn model_names_are_refused_with_the_ones_there_are() {
    assert_eq!(models::by_name("nin").unwrap().title, "NiN");
    let err = models::by_name("resnet").unwrap_err().to_string();
    for name in ["lenet", "alexnet", "vgg11", "nin", "googlenet", "resnet18", "`resnet`"] {
        assert!(err.contains(name), "{err}");
    }
}

#[test]
fn too_small_inputs_name_the_smallest_that_fits() {
    for net in ALL {
        let m = net.min_resolution();
        assert!(net.leaf_shapes(&net.input_shape(1, m)).is_ok(), "{} at {m}", net.name);
        let err = net.leaf_shapes(&net.input_shape(1, m - 1)).unwrap_err().to_string();
        assert!(err.contains(&format!("{m}x{m}")), "{}: {err}", net.name);
    }
    assert_eq!(models::LENET.min_resolution(), 12);
}
