//! One function per subcommand: glue between the CLI and the library, and the exit codes.

use crate::cli::{
    ApplyArgs, CheckArgs, Cli, Command, Format, ProfileCommand, RevertArgs, RunArgs, ShowFormat,
    StatusArgs,
};
use crate::exit;
use crate::{out, outln};
use tuning::apply::{self, Paths, Plan};
use tuning::error::UsageError;
use tuning::host::{self, Host};
use tuning::preflight;
use tuning::profile::{self, Profile};
use tuning::report;

/// Runs the parsed command line; returns the exit code.
pub fn dispatch(cli: Cli) -> anyhow::Result<u8> {
    let host = match &cli.host_root {
        Some(root) => Host::with_root(root),
        None => Host::live(),
    };
    match cli.command {
        Command::Preflight(args) => preflight_cmd(&host, &args),
        Command::Apply(args) => apply_cmd(&host, &args),
        Command::Revert(args) => revert_cmd(&host, &args),
        Command::Profile(ProfileCommand::List) => profile_list(),
        Command::Profile(ProfileCommand::Show { name, format }) => profile_show(&name, format),
        Command::Serve(config) => serve(config),
        Command::Run(args) => run_daemon(host, &args),
        Command::Status(args) => status(&args),
        Command::Token(args) => token(&args),
        Command::Load(args) => {
            let finished = load::generate(&args)?;
            out!("{}", finished.out);
            Ok(finished.code)
        }
    }
}

fn load(spec: &str) -> anyhow::Result<Profile> {
    Ok(profile::load(spec, host::running_as_root())?)
}

/// What a check is against: the profile, the ports the port guard adds to its listen_ports,
/// and the finding ids to ignore. With `--config`, the service's own: its profile, its listen
/// port and its `ignore:` list.
fn check_target(args: &CheckArgs) -> anyhow::Result<(Profile, Vec<u16>, Vec<String>)> {
    let mut ports = args.ports.clone();
    let mut ignore = Vec::new();
    let spec = match &args.config {
        Some(path) => {
            let config = crate::daemon::config::Config::load(path, true, host::running_as_root())?;
            ports.push(config.listen.port());
            ignore = config.ignore.clone();
            config.profile
        }
        None => args.profile.clone(),
    };
    Ok((load(&spec)?, ports, ignore))
}

/// The user's own server of `--unit` / `--pid`, checked before anything runs (a bad unit name
/// is bad usage, exit 2).
fn server_target(args: &CheckArgs) -> anyhow::Result<Option<preflight::server::Target>> {
    Ok(match (&args.unit, args.pid) {
        (Some(name), _) => Some(preflight::server::Target::Unit(
            host::systemd::unit_name(name).map_err(UsageError)?,
        )),
        (None, Some(pid)) => Some(preflight::server::Target::Pid(pid)),
        (None, None) => None,
    })
}

/// Marks the ignored findings of `report`, and says on stderr which ignored ids match no check
/// (a typo would otherwise silently ignore nothing), as the service's gate does.
fn mark_ignored(report: &mut preflight::Report, ignore: Vec<String>) {
    for id in &ignore {
        if !report.findings.iter().any(|f| &f.id == id) {
            eprintln!("tunegate: warning: ignore: no check has the id {id:?} (typo?)");
        }
    }
    report.ignored = ignore;
}

fn preflight_cmd(host: &Host, args: &CheckArgs) -> anyhow::Result<u8> {
    let (profile, ports, ignore) = check_target(args)?;
    let bus = bus(args)?;
    let mut report = preflight::check(&profile, host, &ports)?;
    preflight::add_boot_checks(&mut report, &profile, host, &args.sysctl_dir);
    if let Some(target) = server_target(args)? {
        report
            .findings
            .extend(preflight::server::checks(&profile, host, &target)?);
    }
    if let Some(bus) = &bus {
        report.findings.push(preflight::bus::check(bus));
    }
    mark_ignored(&mut report, ignore);
    match args.format {
        Format::Human => out!("{}", report::preflight_human(&report)),
        Format::Json => outln!("{}", report::preflight_json(&report)),
    }
    Ok(if report.passed() {
        exit::OK
    } else {
        exit::FAIL
    })
}

/// The bus of `--bus` and its secrets, checked before anything runs (a bad URL or an unreadable
/// password file is bad usage, exit 2).
fn bus(args: &CheckArgs) -> anyhow::Result<Option<preflight::bus::Bus>> {
    let Some(url) = &args.bus else {
        return Ok(None);
    };
    let mut bus = preflight::bus::Bus::parse(url).map_err(UsageError)?;
    if let Some(file) = &args.bus_password_file {
        bus = bus.password_from(file).map_err(UsageError)?;
    }
    if let Some(file) = &args.bus_ca_file {
        bus = bus.ca_file(file);
    }
    Ok(Some(bus))
}

fn apply_cmd(host: &Host, args: &ApplyArgs) -> anyhow::Result<u8> {
    if args.check.pid.is_some() {
        return Err(UsageError(
            "apply --pid: a running process keeps the limits it started with; give its unit \
             (--unit NAME) so its next start gets them, or raise it with prlimit"
                .into(),
        )
        .into());
    }
    let target = server_target(&args.check)?;
    let (profile, ports, ignore) = check_target(&args.check)?;
    let bus = bus(&args.check)?;
    let before = preflight::check(&profile, host, &ports)?;
    let plan = Plan::from_report(&before);
    let human = args.check.format == Format::Human;
    if args.dry_run {
        if human {
            outln!(
                "tunegate apply --dry-run: profile {} (nothing will be changed)",
                profile.name
            );
            out!("{}", report::plan_human(&plan));
            out!("{}", report::blocked_human(&plan));
        } else {
            outln!("{}", report::apply_json(&plan, None, None, true));
        }
        return Ok(exit::OK);
    }
    if human {
        outln!("tunegate apply: profile {}", profile.name);
        out!("{}", report::plan_human(&plan));
    }
    let paths = Paths {
        state_dir: args.state.state_dir.clone(),
        sysctl_dir: args.check.sysctl_dir.clone(),
    };
    let mut outcome = apply::apply(&plan, host, &paths, &profile.name, args.persist)?;
    if let (Some(preflight::server::Target::Unit(unit)), None) = (&target, &outcome.failure) {
        let Some((wanted, _)) = &profile.nofile else {
            return Err(UsageError(format!(
                "apply --unit: profile {} has no limits.nofile to give {unit}",
                profile.name
            ))
            .into());
        };
        outcome.unit = Some(apply::unit::apply_unit(
            host,
            &paths,
            unit,
            *wanted,
            &profile.name,
        )?);
    }
    let mut after = preflight::check(&profile, host, &ports)?;
    preflight::add_boot_checks(&mut after, &profile, host, &args.check.sysctl_dir);
    if let Some(target) = &target {
        after
            .findings
            .extend(preflight::server::checks(&profile, host, target)?);
    }
    if let Some(bus) = &bus {
        // Nothing apply can change; checked with the rest of what the host must still do.
        after.findings.push(preflight::bus::check(bus));
    }
    mark_ignored(&mut after, ignore);
    if human {
        out!("{}", report::outcome_human(&outcome));
        out!("{}", report::blocked_human(&Plan::from_report(&after)));
        outln!();
        out!("{}", report::preflight_human(&after));
    } else {
        outln!(
            "{}",
            report::apply_json(&plan, Some(&outcome), Some(&after), false)
        );
    }
    Ok(if outcome.failure.is_some() {
        exit::ROLLED_BACK
    } else if after.passed() {
        exit::OK
    } else {
        exit::FAIL
    })
}

fn revert_cmd(host: &Host, args: &RevertArgs) -> anyhow::Result<u8> {
    let paths = Paths {
        state_dir: args.state.state_dir.clone(),
        sysctl_dir: args.sysctl_dir.clone(),
    };
    let out = apply::revert(host, &paths, args.force)?;
    match args.format {
        Format::Human => out!("{}", report::revert_human(&out)),
        Format::Json => outln!("{}", report::revert_json(&out)),
    }
    Ok(if out.failed.is_empty() {
        exit::OK
    } else {
        exit::FAIL
    })
}

fn profile_list() -> anyhow::Result<u8> {
    outln!("{:<10} {:>12}  description", "name", "connections");
    for name in profile::builtin_names() {
        let p = load(name)?;
        outln!(
            "{:<10} {:>12}  {}",
            p.name,
            p.target_connections.map_or("-".into(), |t| t.to_string()),
            p.description.unwrap_or_default()
        );
    }
    Ok(exit::OK)
}

fn profile_show(name: &str, format: ShowFormat) -> anyhow::Result<u8> {
    let p = load(name)?;
    match format {
        ShowFormat::Yaml => out!("{}", report::profile_yaml(&p)),
        ShowFormat::Json => outln!("{}", report::profile_json(&p)),
    }
    Ok(exit::OK)
}

fn serve(config: relay::Config) -> anyhow::Result<u8> {
    relay::serve(config, |_| {})?;
    Ok(exit::OK)
}

fn run_daemon(host: Host, args: &RunArgs) -> anyhow::Result<u8> {
    crate::daemon::run(crate::daemon::Options {
        config_path: args
            .config
            .clone()
            .unwrap_or_else(|| crate::daemon::config::DEFAULT_PATH.into()),
        explicit: args.config.is_some(),
        host,
    })
}

fn token(args: &crate::cli::TokenArgs) -> anyhow::Result<u8> {
    use relay::auth::{Claims, SigningKey};
    let key = match (&args.secret_file, &args.private_key) {
        (Some(file), _) => SigningKey::Secret(file.clone()),
        (None, Some(file)) => SigningKey::Private(file.clone()),
        (None, None) => unreachable!("clap requires one of them"),
    };
    let now = relay::auth::now();
    let claims = Claims {
        sub: args.sub.clone(),
        exp: now + args.ttl,
        nbf: args.not_before.map(|d| now + d),
        rooms: args.rooms.clone(),
        publish: (!args.publish.is_empty()).then(|| args.publish.clone()),
        send: args.send,
    };
    let token = relay::auth::mint(&key, &claims).map_err(UsageError)?;
    outln!("{token}");
    Ok(exit::OK)
}

fn status(args: &StatusArgs) -> anyhow::Result<u8> {
    let st = crate::daemon::status::Status::load(&args.status_file)?;
    match args.format {
        Format::Human => out!("{}", st.human()),
        Format::Json => {
            #[derive(serde::Serialize)]
            struct StatusJson<'a> {
                schema: &'static str,
                #[serde(flatten)]
                status: &'a crate::daemon::status::Status,
            }
            let doc = StatusJson {
                schema: "tunegate.status/1",
                status: &st,
            };
            outln!("{}", serde_json::to_string_pretty(&doc)?)
        }
    }
    Ok(if st.alive() { exit::OK } else { exit::FAIL })
}
