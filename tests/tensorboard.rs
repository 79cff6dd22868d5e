//! TensorBoard itself (2.21, from the setup venv) serving two tiny runs: its HTTP API, the one its web page
//! reads, shows every plugin active (scalars, images, histograms, text, hparams, projector) and holds our values:
//! the same numbers as eval.json, every tag described, the HParams table comparing both runs.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{fmnist_test_subset, json, ok};
use serde_json::{json, Value};

/// A TensorBoard server on 127.0.0.1, stopped when dropped.
struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(logdir: &Path) -> Server {
        let tb = selfsup_pipeline::venv_python().with_file_name("tensorboard");
        assert!(tb.exists(), "{} missing: run scripts/setup", tb.display());
        // A free port (the race with another process taking it in between is harmless here: start fails loudly).
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(&tb)
            .args(["--logdir", logdir.to_str().unwrap(), "--host", "127.0.0.1", "--port", &port.to_string()])
            // TensorBoard's default loader (its Rust data server), as `tensorboard --logdir` gives every user.
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let server = Server { child, port };
        let t0 = Instant::now();
        loop {
            if let Ok((200, body)) = server.try_request("GET", "/data/runs", None) {
                if body.contains("simclr") && body.contains("mae") {
                    return server;
                }
            }
            assert!(t0.elapsed() < Duration::from_secs(120), "TensorBoard did not serve both runs within 120 s");
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// One HTTP/1.0 request (the server closes the connection after the response): (status, body).
    fn try_request(&self, method: &str, path: &str, body: Option<&Value>) -> std::io::Result<(u16, String)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        write!(
            s,
            "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        Ok((status, body.to_string()))
    }

    fn get(&self, path: &str) -> Value {
        let (status, body) = self.try_request("GET", path, None).unwrap();
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
    }

    fn post(&self, path: &str, request: Value) -> Value {
        let (status, body) = self.try_request("POST", path, Some(&request)).unwrap();
        assert_eq!(status, 200, "POST {path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("POST {path}: {e}: {body}"))
    }
}

fn url(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn tensorboard_serves_every_plugin_with_our_values() {
    let dir = tempfile::tempdir().unwrap();
    let logdir = dir.path().join("runs");
    let test = fmnist_test_subset(dir.path(), 500);
    let test_set = format!("data.test=\"{}\"", test.display());
    // SimCLR: 2 short epochs (a validation point after each), the evaluation with the projector at the end.
    let simclr = logdir.join("simclr");
    let mut args = vec!["pretrain", "--config", "simclr-fmnist-tiny", "--out", simclr.to_str().unwrap(), "--quiet"];
    for s in [
        "data.limit=512",
        "train.batch_size=128",
        "train.epochs=2",
        "train.log_every=2",
        "log.histogram_every=4",
        "eval.train_limit=1000",
        "eval.val_bank_size=1000",
        "eval.probe_epochs=3",
        "eval.projector_samples=100",
        &test_set,
    ] {
        args.extend(["--set", s]);
    }
    ok(&args);
    // MAE: 4 steps, no evaluation: a second row for the HParams table, other hyperparameters.
    let mae = logdir.join("mae");
    let mut args = vec!["pretrain", "--config", "mae-fmnist-tiny", "--out", mae.to_str().unwrap(), "--quiet"];
    for s in ["data.limit=256", "train.batch_size=64", "train.max_steps=4", "eval.at_end=false", &test_set] {
        args.extend(["--set", s]);
    }
    ok(&args);

    let tb = Server::start(&logdir);
    // Every plugin has data. (The projector decides in a thread of its own, started by the first listing, as the
    // web page's polling sees.)
    let wanted = ["scalars", "images", "histograms", "text", "hparams", "projector"];
    let t0 = Instant::now();
    let mut plugins = tb.get("/data/plugins_listing");
    while wanted.iter().any(|p| plugins[p]["enabled"] != true) && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(500));
        plugins = tb.get("/data/plugins_listing");
    }
    for p in wanted {
        assert_eq!(plugins[p]["enabled"], true, "plugin {p} not active: {}", plugins[p]);
    }
    let mut runs: Vec<String> = serde_json::from_value(tb.get("/data/runs")).unwrap();
    runs.sort();
    assert_eq!(runs, ["mae", "simclr"]);

    // Scalars: our tags, each described; the values are eval.json's.
    let tags = tb.get("/data/plugin/scalars/tags");
    let st = &tags["simclr"];
    for tag in ["train/loss", "train/loss/nt_xent", "train/lr", "train/epoch", "train/grad_norm", "val/knn_top1"] {
        let d = st[tag]["description"].as_str().unwrap_or_else(|| panic!("{tag} missing: {st}"));
        assert!(d.len() > 20, "{tag}: description {d:?}");
    }
    assert!(tags["mae"]["train/loss/pixel_mse"].is_object(), "{}", tags["mae"]);
    let undescribed: Vec<String> = ["scalars", "images", "histograms", "text"]
        .iter()
        .flat_map(|plugin| {
            let all = tb.get(&format!("/data/plugin/{plugin}/tags"));
            let mut missing = Vec::new();
            for (run, tags) in all.as_object().unwrap() {
                // The text and histogram plugins list tag names; the others map them to their metadata.
                if let Some(tags) = tags.as_object() {
                    for (tag, meta) in tags {
                        if meta["description"].as_str().unwrap_or("").is_empty() {
                            missing.push(format!("{run}:{tag}"));
                        }
                    }
                }
            }
            missing
        })
        .collect();
    assert!(undescribed.is_empty(), "tags without a description: {undescribed:?}");
    let report = json(&simclr.join("eval.json"));
    let points = |run: &str, tag: &str| -> Vec<Value> {
        tb.get(&format!("/data/plugin/scalars/scalars?run={run}&tag={}", url(tag))).as_array().unwrap().clone()
    };
    let knn = points("simclr", "eval/knn_top1");
    assert_eq!(knn.len(), 1);
    assert!((knn[0][2].as_f64().unwrap() - report["knn"]["top1"].as_f64().unwrap()).abs() < 1e-6);
    let val = points("simclr", "val/knn_top1");
    assert_eq!(val.iter().map(|p| p[1].as_i64().unwrap()).collect::<Vec<_>>(), vec![4, 8], "a point per epoch");
    let worst = points("simclr", "eval/linear_worst_class_top1");
    assert!((worst[0][2].as_f64().unwrap() - report["linear"]["worst_accuracy"].as_f64().unwrap()).abs() < 1e-6);

    // Images: the view grids under their names, the confusion matrix.
    let images = tb.get("/data/plugin/images/tags");
    assert!(images["simclr"]["views/pairs"].is_object(), "{images}");
    assert!(images["mae"]["views/single"].is_object(), "{images}");
    assert!(images["mae"]["reconstruction/original_masked_reconstructed"].is_object(), "{images}");
    assert!(images["simclr"]["eval/linear_confusion_matrix"].is_object(), "{images}");

    // Histograms: every parameter's weights and gradients, at the first log point and at step 4.
    let hist = tb.get("/data/plugin/histograms/tags");
    let h = hist["simclr"].as_object().unwrap();
    assert!(h.contains_key("weights/backbone.conv1.weight") && h.contains_key("gradients/backbone.conv1.weight"));
    assert!(h.contains_key("grad_norm/per_parameter"));
    let series =
        tb.get(&format!("/data/plugin/histograms/histograms?run=simclr&tag={}", url("weights/backbone.conv1.weight")));
    let steps: Vec<i64> = series.as_array().unwrap().iter().map(|p| p[1].as_i64().unwrap()).collect();
    assert_eq!(steps, vec![2, 4, 8], "{series}");

    // Text: the resolved config, the command line, the evaluation report.
    let text_tags = tb.get("/data/plugin/text/tags");
    for tag in ["config/resolved", "config/command_line", "eval/report"] {
        assert!(text_tags["simclr"].as_array().unwrap().iter().any(|t| t == tag), "{text_tags}");
    }
    let text = |tag: &str| tb.get(&format!("/data/plugin/text/text?run=simclr&tag={}", url(tag)));
    let config = text("config/resolved");
    assert!(config[0]["text"].as_str().unwrap().contains("simclr-fmnist-tiny"), "{config}");
    let rep = text("eval/report")[0]["text"].as_str().unwrap().to_string();
    assert!(rep.contains("<table>") && rep.contains("Ankle boot"), "the per-class table as HTML: {rep}");

    // HParams: one experiment, both runs as sessions with their own values and metrics.
    let exp = tb.post("/data/plugin/hparams/experiment", json!({"experimentName": ""}));
    let names: Vec<&str> = exp["hparamInfos"].as_array().unwrap().iter().map(|h| h["name"].as_str().unwrap()).collect();
    for n in ["preset", "objective", "backbone", "optimizer", "lr", "batch_size", "epochs", "views"] {
        assert!(names.contains(&n), "hparam {n} missing: {names:?}");
    }
    let groups = tb.post(
        "/data/plugin/hparams/session_groups",
        json!({"experimentName": "", "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE",
               "STATUS_RUNNING"], "colParams": [], "startIndex": 0, "sliceSize": 100}),
    );
    let groups = groups["sessionGroups"].as_array().unwrap();
    assert_eq!(groups.len(), 2, "{groups:?}");
    let by_objective = |o: &str| groups.iter().find(|g| g["hparams"]["objective"] == o).unwrap().clone();
    let (s, m) = (by_objective("simclr"), by_objective("mae"));
    assert_eq!(s["hparams"]["preset"], "simclr-fmnist-tiny");
    assert_eq!(m["hparams"]["views"], "1x28");
    assert_eq!(s["hparams"]["batch_size"], 128.0);
    let metric = |g: &Value, tag: &str| {
        g["metricValues"].as_array().unwrap().iter().find(|v| v["name"]["tag"] == tag).map(|v| v["value"].clone())
    };
    let linear = metric(&s, "eval/linear_top1").expect("the linear probe as a metric");
    assert!((linear.as_f64().unwrap() - report["linear"]["top1"].as_f64().unwrap()).abs() < 1e-6);
    assert!(metric(&m, "eval/linear_top1").is_none(), "MAE was not evaluated");

    // Projector: the run's embeddings with their sprite.
    let pruns = tb.get("/data/plugin/projector/runs");
    assert!(pruns.as_array().unwrap().iter().any(|r| r == "simclr"), "{pruns}");
    let info = tb.get("/data/plugin/projector/info?run=simclr");
    let emb = &info["embeddings"][0];
    assert_eq!(emb["tensorShape"], json!([100, 128]), "{info}");
    assert!(emb["sprite"].is_object(), "{info}");
}
