//! The TensorBoard sink, checked with TensorBoard's own reader (EventAccumulator from the setup venv).

use selfsup_augment::Image;
use selfsup_pipeline::tensorboard::{grid, upscale, HParam, HValue, Histogram, Metric, Session, Sink, TensorBoard};

#[test]
fn scalars_images_and_histograms_read_back_with_tensorboard() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut tb = TensorBoard::create(dir.path()).unwrap();
        for step in 0..5 {
            tb.scalar("train/loss", step * 10, 1.0 / (step as f64 + 1.0));
        }
        let tiles: Vec<Image> =
            (0..6).map(|i| Image { width: 28, height: 20, channels: 1, data: vec![i * 40; 28 * 20] }).collect();
        tb.image("views/pairs", 0, &grid(&tiles, 4));
        tb.image("rgb", 3, &Image { width: 7, height: 5, channels: 3, data: (0..105).map(|x| x as u8).collect() });
        tb.histogram("weights", 2, &Histogram::of_values(&[0.5, 1.0, 1.5, 2.0], 30));
        tb.text("config/resolved", 0, "```toml\nseed = 0\n```");
        tb.text("config/resolved", 5, "| a | b |\n|---|---|\n| 1 | 2 |");
        let session = Session {
            hparams: vec![
                HParam { name: "objective", description: "d", value: HValue::Text("dino".into()) },
                HParam { name: "lr", description: "d", value: HValue::Number(0.5) },
                HParam { name: "bf16", description: "d", value: HValue::Bool(true) },
            ],
            declared: vec![("mask_ratio", "d", HValue::Number(0.0)), ("lr", "d", HValue::Number(0.0))],
            metrics: vec![Metric {
                tag: "eval/knn_top1",
                group: "",
                display_name: "k-NN",
                description: "d",
                validation: true,
            }],
            start_time_secs: 1.0,
        };
        tb.hparams(&session);
        tb.hparams_end(true);
        tb.flush();
    }
    let ev = selfsup_pipeline::tensorboard::read_back(dir.path()).unwrap();
    let loss = ev["scalars"]["train/loss"].as_array().unwrap();
    assert_eq!(loss.len(), 5);
    assert_eq!(loss[2][0], 20);
    assert!((loss[2][1].as_f64().unwrap() - 1.0 / 3.0).abs() < 1e-6);
    // 4 columns x 2 rows of 28x20 tiles with 2-px borders: width 4*30+2, height 2*22+2 (not transposed).
    assert_eq!(ev["images"]["views/pairs"][0], serde_json::json!([0, 122, 46]));
    assert_eq!(ev["images"]["rgb"][0], serde_json::json!([3, 7, 5]));
    assert_eq!(ev["histograms"]["weights"][0], serde_json::json!([2, 4.0]));
    // Text: both values of the tag, Markdown as written.
    let text = &ev["text"]["config/resolved"];
    assert_eq!(text[0], serde_json::json!([0, "```toml\nseed = 0\n```"]));
    assert_eq!(text[1][0], 5);
    assert_eq!(ev["plugins"]["config/resolved"], "text");
    // HParams: the values with their types, the experiment's names and metrics, the end status (1 = success).
    let h = &ev["hparams"];
    assert_eq!(h["hparams"], serde_json::json!({"objective": "dino", "lr": 0.5, "bf16": true}));
    assert_eq!(h["hparam_names"], serde_json::json!(["objective", "lr", "bf16", "mask_ratio"]));
    assert_eq!(h["metrics"], serde_json::json!([["", "eval/knn_top1"]]));
    assert_eq!(h["status"], 1);
    // Descriptions from the one table, on the first value of each described tag.
    assert!(ev["descriptions"]["train/loss"].as_str().unwrap().contains("backpropagated"));
    assert!(ev["descriptions"]["config/resolved"].as_str().unwrap().contains("resolved"));
    assert_eq!(ev["descriptions"]["rgb"], "", "an undescribed tag has none");
}

#[test]
fn upscale_repeats_pixels() {
    let img = Image { width: 2, height: 1, channels: 3, data: vec![1, 2, 3, 4, 5, 6] };
    let up = upscale(&img, 2);
    assert_eq!((up.width, up.height), (4, 2));
    assert_eq!(up.data, [[1, 2, 3, 1, 2, 3, 4, 5, 6, 4, 5, 6]; 2].concat());
    assert_eq!(upscale(&img, 1), img);
}
