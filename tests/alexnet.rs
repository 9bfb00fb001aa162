//! The AlexNet graph: layer shapes as the book prints them, parameter count and names, init.
use ptxgrad::nn::model::Model;
use ptxgrad::nn::models::ALEXNET;
use ptxgrad::Device;

#[test]
fn summary_matches_the_book() {
    let s = ALEXNET.summary(224).unwrap();
    let lines: Vec<&str> = s.lines().collect();
    // d2l §8.1.2, for X = torch.randn(1, 1, 224, 224).
    let want = [
        ("Conv2d", "[1, 96, 54, 54]"),
        ("ReLU", "[1, 96, 54, 54]"),
        ("MaxPool2d", "[1, 96, 26, 26]"),
        ("Conv2d", "[1, 256, 26, 26]"),
        ("ReLU", "[1, 256, 26, 26]"),
        ("MaxPool2d", "[1, 256, 12, 12]"),
        ("Conv2d", "[1, 384, 12, 12]"),
        ("ReLU", "[1, 384, 12, 12]"),
        ("Conv2d", "[1, 384, 12, 12]"),
        ("ReLU", "[1, 384, 12, 12]"),
        ("Conv2d", "[1, 256, 12, 12]"),
        ("ReLU", "[1, 256, 12, 12]"),
        ("MaxPool2d", "[1, 256, 5, 5]"),
        ("Flatten", "[1, 6400]"),
        ("Linear", "[1, 4096]"),
        ("ReLU", "[1, 4096]"),
        ("Dropout", "[1, 4096]"),
        ("Linear", "[1, 4096]"),
        ("ReLU", "[1, 4096]"),
        ("Dropout", "[1, 4096]"),
        ("Linear", "[1, 10]"),
    ];
    assert_eq!(lines.len(), want.len() + 1, "a line per layer, then the count:\n{s}");
    for (line, (name, shape)) in lines.iter().zip(want) {
        assert!(line.starts_with(name) && line.ends_with(&format!("torch.Size({shape})")), "{line}");
    }
    assert_eq!(lines[want.len()], "parameters: 46764746");
}

#[test]
fn parameter_names_follow_torch_sequential() {
    let names: Vec<String> = ALEXNET.param_shapes(224).unwrap().into_iter().map(|(n, _)| n).collect();
    let want: Vec<String> =
        [0, 3, 6, 8, 10, 14, 17, 20].iter().flat_map(|i| [format!("{i}.weight"), format!("{i}.bias")]).collect();
    assert_eq!(names, want);
    let shapes = ALEXNET.param_shapes(224).unwrap();
    assert_eq!(shapes[0].1, vec![96, 1, 11, 11]); // conv weights OIHW
    assert_eq!(shapes[10].1, vec![4096, 6400]); // dense weights [out, in]
}

#[test]
fn the_graph_works_from_65_pixels_and_says_why_below() {
    // conv1 (11x11, s4, p1) must leave 15x15 for the three 3x3/s2 pools to end at 1x1:
    // floor((r + 2 - 11) / 4) + 1 >= 15  <=>  r - 9 >= 56  <=>  r >= 65.
    assert_eq!(ALEXNET.min_resolution(), 65);
    assert_eq!(ALEXNET.leaf_shapes(&[1, 1, 65, 65]).unwrap()[13], vec![1, 256]);
    assert_eq!(ALEXNET.leaf_shapes(&[1, 1, 67, 67]).unwrap()[13], vec![1, 256]);
    let err = ALEXNET.leaf_shapes(&[1, 1, 64, 64]).unwrap_err().to_string();
    assert!(err.contains("from 65x65 up"), "{err}");
}

#[test]
fn xavier_uniform_init_and_zero_biases() {
    let model = Model::new(&ALEXNET, 67, 3, &Device::Cpu).unwrap();
    for p in &model.params {
        let values = p.value.to_vec().unwrap();
        if p.name.ends_with("bias") {
            assert!(values.iter().all(|&x| x == 0.0), "{} not zero", p.name);
        } else {
            let shape = p.value.shape();
            let receptive_field: usize = shape[2..].iter().product();
            let bound = (6.0 / ((shape[0] + shape[1]) * receptive_field) as f64).sqrt() as f32;
            let max = values.iter().fold(0f32, |max, x| max.max(x.abs()));
            // Uniform on (-bound, bound): the largest |w| of thousands of draws is close to bound.
            assert!(max <= bound && max > 0.9 * bound, "{}: max {max}, bound {bound}", p.name);
        }
    }
    let again = Model::new(&ALEXNET, 67, 3, &Device::Cpu).unwrap();
    assert_eq!(model.params[0].value.to_vec().unwrap(), again.params[0].value.to_vec().unwrap(), "seeded");
}
