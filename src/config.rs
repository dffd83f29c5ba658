//! Layered configuration for the binaries: every option of a clap command can be given as its
//! flag, its environment variable, or a key of the TOML file named by `--config`, and that is
//! the order of precedence, before the option's default: **flag > env > file > default**.
//!
//! File keys are the flags' long names (`max-token-lifetime = "24h"`, `dev = true`,
//! `rsa-bits = 3072`). The file is held to the same rules as the flags: an unreadable file, bad
//! TOML, an unknown key or a value the flag's own parser refuses is an error naming the file and
//! the key, and the binaries exit 64 on it. A key given in the file and also by flag or env is
//! still checked, then overridden.
//!
//! The layering works on clap's description of the command, so an option added to a binary's
//! `Cli` struct is settable from the file with no change here.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, Command, Parser};

/// Exit code for invalid configuration (sysexits `EX_USAGE`).
pub const EXIT_CONFIG: u8 = 64;

/// Where a setting's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Its flag on the command line.
    Flag,
    /// Its environment variable (named).
    Env(String),
    /// The config file.
    File(PathBuf),
    /// Its default (or it is unset).
    Default,
}

/// Parsed options, with where each came from.
#[derive(Debug)]
pub struct Layered<T> {
    /// The options.
    pub value: T,
    /// Where each came from.
    pub provenance: Provenance,
}

/// Where each option's value came from.
#[derive(Debug, Default)]
pub struct Provenance {
    sources: BTreeMap<String, Source>,
}

impl Provenance {
    /// Where the option with long name `long` (e.g. `issuer`) came from.
    pub fn source(&self, long: &str) -> Source {
        self.sources.get(long).cloned().unwrap_or(Source::Default)
    }

    /// `message` with, when it starts by naming an option (`--issuer: ...`) that was not set by
    /// its flag, where its value came from: an env var or the config file.
    pub fn explain(&self, message: &str) -> String {
        let Some(rest) = message.strip_prefix("--") else {
            return message.to_owned();
        };
        let long: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        match self.source(&long) {
            Source::Env(var) => format!("{message} (set by the environment variable {var})"),
            Source::File(path) => format!("{message} (set in the config file {})", path.display()),
            Source::Flag | Source::Default => message.to_owned(),
        }
    }
}

/// Configuration that cannot be used.
#[derive(Debug)]
pub enum ConfigError {
    /// From clap: a bad flag or env value — or `--help`/`--version`, which are not errors.
    Args(clap::Error),
    /// A bad value that came from an environment variable (clap names only the flag).
    Env {
        /// The variable.
        var: String,
        /// clap's message, first line.
        message: String,
    },
    /// The config file, or a key in it.
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the key when one is at fault.
        reason: String,
    },
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::Args(e) => write!(f, "{}", e.to_string().trim_end()),
            ConfigError::Env { var, message } => {
                write!(f, "{message} (set by the environment variable {var})")
            }
            ConfigError::File { path, reason } => {
                write!(f, "config file {}: {reason}", path.display())
            }
        }
    }
}

impl ConfigError {
    /// Prints the error (or the help/version text) and gives the exit code: 0 for help and
    /// version, [`EXIT_CONFIG`] for everything else.
    pub fn report(&self, program: &str) -> ExitCode {
        match self {
            ConfigError::Args(e) if !e.use_stderr() => {
                let _ = e.print();
                ExitCode::SUCCESS
            }
            ConfigError::Args(e) => {
                let _ = e.print();
                ExitCode::from(EXIT_CONFIG)
            }
            ConfigError::File { .. } | ConfigError::Env { .. } => {
                eprintln!("{program}: invalid configuration: {self}");
                ExitCode::from(EXIT_CONFIG)
            }
        }
    }

    fn file(path: &Path, reason: impl Into<String>) -> Self {
        ConfigError::File {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

/// Parses `args` (the program name first) for `T`, layering the TOML file named by the option
/// whose id is `config_id` (a `PathBuf`) between the environment and the defaults. When a
/// subcommand is given, the file is not read: subcommands take flags and env only.
pub fn parse<T: Parser>(args: Vec<OsString>, config_id: &str) -> Result<Layered<T>, ConfigError> {
    let cmd = document_defaults(T::command());
    let matches = cmd
        .clone()
        .try_get_matches_from(&args)
        .map_err(|e| from_env(&cmd, &args, e))?;
    let mut sources = BTreeMap::new();
    for arg in cmd.get_arguments() {
        let (Some(long), Some(source)) =
            (arg.get_long(), matches.value_source(arg.get_id().as_str()))
        else {
            continue;
        };
        let source = match source {
            ValueSource::CommandLine => Source::Flag,
            ValueSource::EnvVariable => Source::Env(
                arg.get_env()
                    .map(|e| e.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            ),
            _ => Source::Default,
        };
        sources.insert(long.to_owned(), source);
    }
    let file = match matches.subcommand() {
        Some(_) => None,
        None => matches
            .try_get_one::<PathBuf>(config_id)
            .ok()
            .flatten()
            .cloned(),
    };
    let Some(path) = file else {
        let value = T::from_arg_matches(&matches).map_err(ConfigError::Args)?;
        return Ok(Layered {
            value,
            provenance: Provenance { sources },
        });
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| ConfigError::file(&path, format!("cannot read it: {e}")))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::file(&path, format!("not valid TOML: {e}")))?;

    let checker = cmd.clone().mut_args(|a| a.env(None::<&str>));
    let mut from_file: Vec<OsString> = Vec::new();
    for (key, value) in &table {
        let arg = settable(&cmd, key, config_id)
            .ok_or_else(|| unknown_key(&cmd, key, config_id, &path))?;
        let multiple = matches!(arg.get_action(), ArgAction::Append);
        let values =
            scalar_values(key, value, multiple).map_err(|r| ConfigError::file(&path, r))?;
        let flag_form = flag_form(arg, key, &values).map_err(|r| ConfigError::file(&path, r))?;
        check_values(&checker, &flag_form)
            .map_err(|r| ConfigError::file(&path, format!("{key}: {r}")))?;
        if matches!(
            sources.get(key.as_str()),
            Some(Source::Flag | Source::Env(_))
        ) {
            continue;
        }
        sources.insert(key.clone(), Source::File(path.clone()));
        from_file.extend(flag_form);
    }
    // File values go right after the program name: the command line stays as typed after them.
    let mut all = Vec::with_capacity(args.len() + from_file.len());
    all.extend(args.first().cloned());
    all.extend(from_file);
    all.extend(args.into_iter().skip(1));
    let matches = cmd.try_get_matches_from(all).map_err(ConfigError::Args)?;
    let value = T::from_arg_matches(&matches).map_err(ConfigError::Args)?;
    Ok(Layered {
        value,
        provenance: Provenance { sources },
    })
}

/// A clap error, as [`ConfigError::Env`] when the bad value came from an option's environment
/// variable rather than the command line.
fn from_env(cmd: &Command, args: &[OsString], e: clap::Error) -> ConfigError {
    use clap::error::{ContextKind, ContextValue};
    let var = (|| {
        if !matches!(
            e.kind(),
            ErrorKind::ValueValidation | ErrorKind::InvalidValue
        ) {
            return None;
        }
        let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) else {
            return None;
        };
        let long = arg.strip_prefix("--")?.split([' ', '=']).next()?;
        let var = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(long))?
            .get_env()?;
        let flag = format!("--{long}");
        let on_command_line = args.iter().skip(1).any(|a| {
            a.to_str()
                .is_some_and(|a| a == flag || a.starts_with(&format!("{flag}=")))
        });
        (!on_command_line && std::env::var_os(var).is_some())
            .then(|| var.to_string_lossy().into_owned())
    })();
    match var {
        Some(var) => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            ConfigError::Env {
                var,
                message: first.strip_prefix("error: ").unwrap_or(first).to_owned(),
            }
        }
        None => ConfigError::Args(e),
    }
}

/// Makes `--help` state every option's default: clap shows `[default: X]` for options that have
/// one; the others get `[default: none]` (or `[default: off]` for switches) unless their help
/// already speaks of a default.
pub fn document_defaults(cmd: Command) -> Command {
    cmd.mut_args(|arg| {
        let takes_value = !matches!(
            arg.get_action(),
            ArgAction::SetTrue
                | ArgAction::SetFalse
                | ArgAction::Count
                | ArgAction::Help
                | ArgAction::HelpShort
                | ArgAction::HelpLong
                | ArgAction::Version
        );
        let is_switch = matches!(arg.get_action(), ArgAction::SetTrue);
        if !(is_switch || takes_value && arg.get_default_values().is_empty()) {
            return arg;
        }
        let note = if is_switch {
            "[default: off]"
        } else {
            "[default: none]"
        };
        let short = arg.get_help().map(ToString::to_string);
        let long = arg.get_long_help().map(ToString::to_string);
        let mentions = |h: &Option<String>| {
            h.as_deref()
                .is_some_and(|h| h.to_ascii_lowercase().contains("default"))
        };
        if mentions(&short) || mentions(&long) {
            return arg;
        }
        let add = |h: String| format!("{} {note}", h.trim_end());
        let arg = match short {
            Some(h) => arg.help(add(h)),
            None => arg,
        };
        match long {
            Some(h) => arg.long_help(add(h)),
            None => arg,
        }
    })
}

/// The option a file key sets: a long option other than the config file itself, help, version.
fn settable<'a>(cmd: &'a Command, key: &str, config_id: &str) -> Option<&'a Arg> {
    cmd.get_arguments().find(|a| {
        a.get_long() == Some(key)
            && a.get_id().as_str() != config_id
            && !matches!(
                a.get_action(),
                ArgAction::Help | ArgAction::HelpLong | ArgAction::HelpShort | ArgAction::Version
            )
    })
}

fn unknown_key(cmd: &Command, key: &str, config_id: &str, path: &Path) -> ConfigError {
    let dashed = key.replace('_', "-");
    let hint = if dashed != key && settable(cmd, &dashed, config_id).is_some() {
        format!("; did you mean `{dashed}`?")
    } else {
        let known: Vec<&str> = cmd
            .get_arguments()
            .filter_map(|a| settable(cmd, a.get_long()?, config_id)?.get_long())
            .collect();
        format!("; the settings are: {}", known.join(", "))
    };
    ConfigError::file(path, format!("unknown setting `{key}`{hint}"))
}

/// A TOML value as the text(s) its flag would take.
fn scalar_values(key: &str, value: &toml::Value, multiple: bool) -> Result<Vec<String>, String> {
    let scalar = |v: &toml::Value| -> Result<String, String> {
        match v {
            toml::Value::String(s) => Ok(s.clone()),
            toml::Value::Integer(i) => Ok(i.to_string()),
            toml::Value::Float(_) => Err(format!(
                "{key}: no setting takes a fractional number; write an integer or a string \
                 such as \"90s\""
            )),
            toml::Value::Boolean(b) => Ok(b.to_string()),
            _ => Err(format!(
                "{key}: expected a string, number or boolean, not {}",
                v.type_str()
            )),
        }
    };
    match value {
        toml::Value::Array(items) if multiple => items.iter().map(scalar).collect(),
        toml::Value::Array(_) => Err(format!("{key}: takes one value, not a list")),
        v => Ok(vec![scalar(v)?]),
    }
}

/// The command-line form of a file key: `--key=value` per value, or `--key` for a switch set to
/// true (nothing for false).
fn flag_form(arg: &Arg, key: &str, values: &[String]) -> Result<Vec<OsString>, String> {
    if matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse) {
        return match values {
            [v] if v == "true" => Ok(vec![format!("--{key}").into()]),
            [v] if v == "false" => Ok(vec![]),
            _ => Err(format!("{key}: expected true or false")),
        };
    }
    Ok(values
        .iter()
        .map(|v| format!("--{key}={v}").into())
        .collect())
}

/// Runs the option's own parser on the file's value, with no env and nothing else given, so a
/// bad value is named as the file's. Errors about other options (missing, conflicting) are left
/// to the final parse.
fn check_values(checker: &Command, flag_form: &[OsString]) -> Result<(), String> {
    let mut argv: Vec<OsString> = vec![OsStr::new("check").to_owned()];
    argv.extend(flag_form.iter().cloned());
    match checker.clone().try_get_matches_from(argv) {
        Ok(_) => Ok(()),
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::InvalidValue
                    | ErrorKind::ValueValidation
                    | ErrorKind::InvalidUtf8
                    | ErrorKind::TooManyValues
                    | ErrorKind::TooFewValues
                    | ErrorKind::WrongNumberOfValues
            ) =>
        {
            Err(clap_reason(&e))
        }
        Err(_) => Ok(()),
    }
}

/// The essence of a clap error: its validator's message, or its first line without `error: `.
fn clap_reason(e: &clap::Error) -> String {
    if let Some(source) = std::error::Error::source(e) {
        let value = e
            .get(clap::error::ContextKind::InvalidValue)
            .map(|v| format!("invalid value '{v}': "))
            .unwrap_or_default();
        return format!("{value}{source}");
    }
    let text = e.to_string();
    let first = text
        .lines()
        .next()
        .unwrap_or("")
        .trim_start_matches("error: ");
    match e.get(clap::error::ContextKind::ValidValue) {
        Some(valid) => format!("{first} (possible values: {valid})"),
        None => first.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::time::Duration;

    use super::*;
    use crate::duration::parse_duration;

    #[derive(Debug, Parser)]
    struct Cli {
        #[arg(long, env = "OIDC_CONFIG_TEST_CONFIG")]
        config: Option<PathBuf>,
        #[arg(
            long,
            env = "OIDC_CONFIG_TEST_ISSUER",
            default_value = "https://default.example/"
        )]
        issuer: String,
        #[arg(long, env = "OIDC_CONFIG_TEST_LIFETIME", default_value = "24h", value_parser = parse_duration)]
        max_token_lifetime: Duration,
        #[arg(long, default_value_t = 2048)]
        rsa_bits: u32,
        #[arg(long)]
        dev: bool,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long = "allow")]
        allow: Vec<String>,
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    fn args(extra: &[&str]) -> Vec<OsString> {
        std::iter::once("prog")
            .chain(extra.iter().copied())
            .map(OsString::from)
            .collect()
    }

    #[test]
    fn file_values_fill_in_under_flags() {
        let f = file(
            "issuer = \"https://file.example/\"\nmax-token-lifetime = \"2h\"\nrsa-bits = 3072\n\
             dev = true\ndata-dir = \"/var/lib/x\"\nallow = [\"a\", \"b\"]\n",
        );
        let path = f.path().to_str().unwrap();
        let l = parse::<Cli>(args(&["--config", path, "--rsa-bits", "4096"]), "config").unwrap();
        assert_eq!(l.value.issuer, "https://file.example/");
        assert_eq!(l.value.max_token_lifetime, Duration::from_secs(7200));
        assert_eq!(l.value.rsa_bits, 4096);
        assert!(l.value.dev);
        assert_eq!(l.value.data_dir, Some(PathBuf::from("/var/lib/x")));
        assert_eq!(l.value.allow, ["a", "b"]);
        assert_eq!(l.provenance.source("rsa-bits"), Source::Flag);
        assert_eq!(
            l.provenance.source("issuer"),
            Source::File(f.path().to_path_buf())
        );
        assert!(
            l.provenance
                .explain("--issuer: bad")
                .ends_with(&format!("(set in the config file {path})"))
        );
        assert_eq!(l.provenance.explain("--rsa-bits: bad"), "--rsa-bits: bad");
    }

    #[test]
    fn without_a_file_defaults_apply() {
        let l = parse::<Cli>(args(&[]), "config").unwrap();
        assert_eq!(l.value.issuer, "https://default.example/");
        assert_eq!(l.provenance.source("issuer"), Source::Default);
    }

    #[test]
    fn bad_files_are_refused_naming_the_key() {
        let cases = [
            ("issuer = ", "not valid TOML"),
            (
                "max_token_lifetime = \"2h\"",
                "unknown setting `max_token_lifetime`; did you mean `max-token-lifetime`?",
            ),
            (
                "colour = \"blue\"",
                "unknown setting `colour`; the settings are: issuer",
            ),
            ("config = \"/x\"", "unknown setting `config`"),
            (
                "max-token-lifetime = \"soon\"",
                "max-token-lifetime: invalid value 'soon'",
            ),
            ("rsa-bits = \"many\"", "rsa-bits: invalid value 'many'"),
            ("issuer = [\"a\"]", "issuer: takes one value, not a list"),
            ("dev = \"yes\"", "dev: expected true or false"),
            (
                "issuer = { a = 1 }",
                "issuer: expected a string, number or boolean, not table",
            ),
        ];
        for (text, want) in cases {
            let f = file(text);
            let err = parse::<Cli>(args(&["--config", f.path().to_str().unwrap()]), "config")
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{text:?}: {err}");
            assert!(err.starts_with("config file "), "{err}");
        }
        let err = parse::<Cli>(args(&["--config", "/nonexistent/oidc.toml"]), "config")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot read it"), "{err}");
    }
}
