//! `selfsup presets`: every built-in preset with a one-line description (its TOML file's header comment) and the
//! facts that tell presets apart (objective, views, epochs, batch, device), the presets for a folder of photos
//! first; and `selfsup completions`.

use std::io::Write;

use selfsup_pipeline::trainer::report::{backbone_name, views_summary};
use selfsup_pipeline::Config;

/// The first line of a preset's header comment, without the `#`.
fn description(toml: &str) -> String {
    let first = toml.lines().find_map(|l| l.strip_prefix('#')).map(str::trim).unwrap_or("");
    // Header lines break mid-sentence: cut at the last clause that ends on the line.
    match first.rfind(['.', ':', ';']) {
        Some(i) if i > 20 => first[..i].to_string(),
        _ => first.trim_end_matches([',', '(']).to_string(),
    }
}

/// Whether a preset is for a folder of the user's own photos (`*-photos*`): the main use, listed first.
fn for_photos(name: &str) -> bool {
    name.contains("-photos")
}

/// The presets in the order `presets` lists them: those for a folder of photos first, then the others (the
/// Fashion-MNIST demos and references), each group in the given (name) order.
fn ordered<'a>(presets: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut out = presets.to_vec();
    out.sort_by_key(|(name, _)| !for_photos(name));
    out
}

/// One line per preset: name, facts, description; photo presets first ([`ordered`]).
pub fn list(presets: &[(&str, &str)]) -> String {
    let width = presets.iter().map(|p| p.0.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (name, text) in ordered(presets) {
        let facts = match Config::from_toml(text, &format!("preset {name}"), &[]) {
            Ok(cfg) => {
                let json = serde_json::to_value(&cfg).unwrap_or_default();
                format!(
                    "{} {} | {} | {} epochs, batch {} | {}",
                    json["objective"]["kind"].as_str().unwrap_or("?"),
                    backbone_name(&cfg),
                    views_summary(&cfg),
                    cfg.train.epochs,
                    cfg.train.batch_size,
                    json["train"]["device"].as_str().unwrap_or("auto"),
                )
            }
            Err(e) => format!("(does not load: {e})"),
        };
        out += &format!("{name:<width$}  {}\n{:<width$}  {facts}\n", description(text), "");
    }
    out
}

/// Writes the completion script for `shell` to stdout.
pub fn completions(shell: clap_complete::Shell, cmd: &mut clap::Command) {
    let name = cmd.get_name().to_string();
    // Into memory first: a closed stdout (`| head`) is not a panic.
    let mut script = Vec::new();
    clap_complete::generate(shell, cmd, name, &mut script);
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(&script).and_then(|()| out.flush());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptions_end_on_a_whole_clause() {
        let t = "# SimCLR on Fashion-MNIST sized for a 2-core CPU (the demo and the test preset): a narrow, shallow ResNet,\n# more";
        assert_eq!(description(t), "SimCLR on Fashion-MNIST sized for a 2-core CPU (the demo and the test preset)");
        assert_eq!(description("# Short one.\nname = 1"), "Short one.");
        assert_eq!(description("name = \"x\""), "");
    }

    #[test]
    fn photo_presets_come_first_in_name_order() {
        let given = [("byol-fmnist", ""), ("dino-photos", ""), ("simclr-fmnist", ""), ("byol-photos-tiny", "")];
        let names: Vec<&str> = ordered(&given).iter().map(|p| p.0).collect();
        assert_eq!(names, ["dino-photos", "byol-photos-tiny", "byol-fmnist", "simclr-fmnist"]);
        let listed = list(&given);
        let first: Vec<&str> = listed.lines().step_by(2).filter_map(|l| l.split_whitespace().next()).collect();
        assert_eq!(first, names);
    }
}
