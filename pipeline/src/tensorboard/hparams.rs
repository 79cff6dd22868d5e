//! TensorBoard's hparams plugin: the messages of its `plugin_data.proto` and `api.proto` (TensorBoard 2.21) as
//! prost messages, and a run's [`Session`] (its hyperparameters and the metrics that judge it) encoded into
//! them. Every run writes the same experiment (the same hyperparameter and metric names), so TensorBoard's
//! HParams table and parallel-coordinates view line up runs of different objectives; the metric values are the
//! last values of ordinary scalar tags (`eval/knn_top1`, ...) of the run or of its sub-folders (`group`).

use std::collections::HashMap;

use prost::Message;
use prost_types::value::Kind;

pub const PLUGIN: &str = "hparams";
const EXPERIMENT_TAG: &str = "_hparams_/experiment";
const SESSION_START_TAG: &str = "_hparams_/session_start_info";
const SESSION_END_TAG: &str = "_hparams_/session_end_info";

#[derive(Clone, PartialEq, Message)]
struct HParamsPluginData {
    #[prost(int32, tag = "1")]
    version: i32,
    #[prost(oneof = "Data", tags = "2, 3, 4")]
    data: Option<Data>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum Data {
    #[prost(message, tag = "2")]
    Experiment(Experiment),
    #[prost(message, tag = "3")]
    SessionStartInfo(SessionStartInfo),
    #[prost(message, tag = "4")]
    SessionEndInfo(SessionEndInfo),
}

#[derive(Clone, PartialEq, Message)]
struct Experiment {
    #[prost(string, tag = "6")]
    name: String,
    #[prost(string, tag = "1")]
    description: String,
    #[prost(string, tag = "2")]
    user: String,
    #[prost(double, tag = "3")]
    time_created_secs: f64,
    #[prost(message, repeated, tag = "4")]
    hparam_infos: Vec<HParamInfo>,
    #[prost(message, repeated, tag = "5")]
    metric_infos: Vec<MetricInfo>,
}

#[derive(Clone, PartialEq, Message)]
struct HParamInfo {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    display_name: String,
    #[prost(string, tag = "3")]
    description: String,
    /// `DataType`: 1 string, 2 bool, 3 float64.
    #[prost(int32, tag = "4")]
    r#type: i32,
}

#[derive(Clone, PartialEq, Message)]
struct MetricInfo {
    #[prost(message, optional, tag = "1")]
    name: Option<MetricName>,
    #[prost(string, tag = "3")]
    display_name: String,
    #[prost(string, tag = "4")]
    description: String,
    /// `DatasetType`: 0 unknown, 1 training, 2 validation.
    #[prost(int32, tag = "5")]
    dataset_type: i32,
}

#[derive(Clone, PartialEq, Message)]
struct MetricName {
    #[prost(string, tag = "1")]
    group: String,
    #[prost(string, tag = "2")]
    tag: String,
}

#[derive(Clone, PartialEq, Message)]
struct SessionStartInfo {
    #[prost(map = "string, message", tag = "1")]
    hparams: HashMap<String, prost_types::Value>,
    #[prost(string, tag = "2")]
    model_uri: String,
    #[prost(string, tag = "3")]
    monitor_url: String,
    #[prost(string, tag = "4")]
    group_name: String,
    #[prost(double, tag = "5")]
    start_time_secs: f64,
}

#[derive(Clone, PartialEq, Message)]
struct SessionEndInfo {
    /// `Status`: 1 success, 2 failure.
    #[prost(int32, tag = "1")]
    status: i32,
    #[prost(double, tag = "2")]
    end_time_secs: f64,
}

/// A hyperparameter's value.
#[derive(Clone, Debug, PartialEq)]
pub enum HValue {
    Text(String),
    Number(f64),
    Bool(bool),
}

#[derive(Clone, Debug, PartialEq)]
pub struct HParam {
    pub name: &'static str,
    pub description: &'static str,
    pub value: HValue,
}

/// A metric of the HParams table: the last value of scalar `tag` in the run's sub-folder `group` ("" = the run
/// folder itself).
#[derive(Clone, Debug, PartialEq)]
pub struct Metric {
    pub tag: &'static str,
    pub group: &'static str,
    pub display_name: &'static str,
    pub description: &'static str,
    pub validation: bool,
}

/// What one run declares to the HParams tab.
#[derive(Clone, Debug, PartialEq)]
pub struct Session {
    pub hparams: Vec<HParam>,
    /// Hyperparameters declared (so that every run declares the same columns: TensorBoard takes the experiment
    /// of one run) without a value in this run, with their type.
    pub declared: Vec<(&'static str, &'static str, HValue)>,
    pub metrics: Vec<Metric>,
    pub start_time_secs: f64,
}

fn encode(data: Data) -> Vec<u8> {
    HParamsPluginData { version: 0, data: Some(data) }.encode_to_vec()
}

impl Session {
    /// The experiment and the session start, as (tag, plugin content) pairs.
    pub fn encode(&self) -> Vec<(&'static str, Vec<u8>)> {
        let declared = self.declared.iter().filter(|d| !self.hparams.iter().any(|h| h.name == d.0));
        let hparam_infos = (self.hparams.iter().map(|h| (h.name, h.description, &h.value)))
            .chain(declared.map(|(n, d, v)| (*n, *d, v)))
            .map(|(name, description, value)| HParamInfo {
                name: name.into(),
                display_name: name.into(),
                description: description.into(),
                r#type: match value {
                    HValue::Text(_) => 1,
                    HValue::Bool(_) => 2,
                    HValue::Number(_) => 3,
                },
            })
            .collect();
        let metric_infos = self
            .metrics
            .iter()
            .map(|m| MetricInfo {
                name: Some(MetricName { group: m.group.into(), tag: m.tag.into() }),
                display_name: m.display_name.into(),
                description: m.description.into(),
                dataset_type: if m.validation { 2 } else { 1 },
            })
            .collect();
        let experiment = Experiment {
            name: String::new(),
            description: "selfsup runs: resolved configs and final metrics".into(),
            user: String::new(),
            time_created_secs: self.start_time_secs,
            hparam_infos,
            metric_infos,
        };
        let hparams = self
            .hparams
            .iter()
            .map(|h| {
                let kind = match &h.value {
                    HValue::Text(s) => Kind::StringValue(s.clone()),
                    HValue::Number(x) => Kind::NumberValue(*x),
                    HValue::Bool(b) => Kind::BoolValue(*b),
                };
                (h.name.to_string(), prost_types::Value { kind: Some(kind) })
            })
            .collect();
        let start = SessionStartInfo {
            hparams,
            model_uri: String::new(),
            monitor_url: String::new(),
            group_name: String::new(),
            start_time_secs: self.start_time_secs,
        };
        vec![
            (EXPERIMENT_TAG, encode(Data::Experiment(experiment))),
            (SESSION_START_TAG, encode(Data::SessionStartInfo(start))),
        ]
    }
}

/// The session end (success or failure), as (tag, plugin content).
pub fn end(ok: bool) -> (&'static str, Vec<u8>) {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    (
        SESSION_END_TAG,
        encode(Data::SessionEndInfo(SessionEndInfo { status: if ok { 1 } else { 2 }, end_time_secs: secs })),
    )
}
