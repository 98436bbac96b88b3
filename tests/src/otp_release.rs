//! Real OTP releases for the otp_release runtime tests: a rebar3 project written by the test
//! into a temp dir (the `pm` app: a prime miner gen_server under a supervisor, every prime kept
//! in its state), built offline with Debian's rebar3 into release tarballs (`rebar3 as prod
//! release`, `relup`, `tar`), and nodes started from a tarball with relx's own `bin/pm daemon`
//! (long names on 127.0.0.1, `vm.args.src` with `-name ${NODE_NAME}` and `-setcookie ${COOKIE}`,
//! a private epmd through `ERL_EPMD_PORT`). Every node is killed when its guard drops.
//!
//! Beside the supervised miner, the app starts `tally`, a registered gen_server in no
//! supervision tree (started by hand in `pm_app:start/2`), whose state v2 converts: the release
//! handler does not see it, hotroll must. `pm_idle` exports `code_change/3` but no process runs
//! it: its code_change reaches nothing, which the rollout's history must say.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use crate::cluster::run_command;
use crate::erlang::ErlNode;
use crate::poll::poll;

/// `Ok` when rebar3 (which brings Erlang) and the tools the tests use are installed; else how
/// to install them.
pub fn require() -> anyhow::Result<()> {
    crate::tools::require(&["rebar3", "erl", "epmd", "erl_call", "tar"], "rebar3")
}

const REBAR_CONFIG: &str = r#"{erl_opts, [debug_info]}.
{deps, []}.
{relx, [{release, {pm, "@VSN@"}, [pm, sasl]},
        {vm_args_src, "config/vm.args.src"},
        {sys_config_src, "config/sys.config.src"},
        {extended_start_script, true}]}.
{profiles, [{prod, [{relx, [{dev_mode, false}, {include_erts, false}, {include_src, false}]}]}]}.
"#;

// The node's identity comes from the OS environment relx substitutes at start.
const VM_ARGS_SRC: &str = "-name ${NODE_NAME}\n-setcookie ${COOKIE}\n-start_epmd false\n\
-kernel inet_dist_use_interface {127,0,0,1}\n";

const APP_SRC: &str = r#"{application, pm, [{description, "prime miner"}, {vsn, "@VSN@"},
  {registered, [pm, pm_sup, tally]}, {mod, {pm_app, []}},
  {applications, [kernel, stdlib, sasl]}, {env, []}]}.
"#;

// `tally` is started by hand, linked to nothing: no supervisor knows it.
const PM_APP: &str = "-module(pm_app).\n-behaviour(application).\n-export([start/2, stop/1]).\n\
start(_, _) -> {ok, _} = gen_server:start({local, tally}, tally, [], []), pm_sup:start_link().\n\
stop(_) -> ok.\n";

/// v1 counts in an integer.
const TALLY_V1: &str = r#"-module(tally).
-behaviour(gen_server).
-export([init/1, handle_call/3, handle_cast/2, code_change/3]).
init([]) -> {ok, 0}.
handle_call(bump, _, N) -> {reply, N + 1, N + 1};
handle_call(count, _, N) -> {reply, N, N};
handle_call(format, _, N) -> {reply, integer, N}.
handle_cast(_, S) -> {noreply, S}.
code_change(_, S, _) -> {ok, S}.
"#;

/// v2 counts in a map; its code_change converts both ways.
const TALLY_V2: &str = r#"-module(tally).
-behaviour(gen_server).
-export([init/1, handle_call/3, handle_cast/2, code_change/3]).
init([]) -> {ok, #{count => 0}}.
handle_call(bump, _, #{count := N} = S) -> {reply, N + 1, S#{count := N + 1}};
handle_call(count, _, #{count := N} = S) -> {reply, N, S};
%% Says what the state really is: a process left with v1's integer under this code answers
%% `integer`.
handle_call(format, _, S) when is_map(S) -> {reply, map, S};
handle_call(format, _, S) -> {reply, integer, S}.
handle_cast(_, S) -> {noreply, S}.
code_change({down, _}, #{count := N}, _) -> {ok, N};
code_change(_, N, _) when is_integer(N) -> {ok, #{count => N}}.
"#;

/// A module with a code_change that no process runs.
const PM_IDLE_V1: &str = "-module(pm_idle).\n-export([version/0, code_change/3]).\n\
version() -> 1.\ncode_change(_, S, _) -> {ok, S}.\n";
const PM_IDLE_V2: &str = "-module(pm_idle).\n-export([version/0, code_change/3]).\n\
version() -> 2.\ncode_change(_, S, _) -> {ok, S}.\n";

const PM_SUP: &str = "-module(pm_sup).\n-behaviour(supervisor).\n-export([start_link/0, init/1]).\n\
start_link() -> supervisor:start_link({local, pm_sup}, ?MODULE, []).\n\
init([]) -> {ok, {#{strategy => one_for_one, intensity => 0},\n\
  [#{id => pm, start => {pm, start_link, []}, modules => [pm]}]}}.\n";

/// v1 keeps `{Next, Primes}`.
const PM_V1: &str = r#"-module(pm).
-behaviour(gen_server).
-export([start_link/0, primes/0, init/1, handle_call/3, handle_cast/2, handle_info/2, code_change/3]).
start_link() -> gen_server:start_link({local, pm}, ?MODULE, [], []).
primes() -> gen_server:call(pm, primes).
init([]) -> self() ! mine, {ok, {2, []}}.
handle_call(primes, _, {_, Ps} = S) -> {reply, lists:reverse(Ps), S};
handle_call(format, _, S) -> {reply, tuple, S}.
handle_cast(_, S) -> {noreply, S}.
handle_info(mine, {N, Ps}) ->
    erlang:send_after(2, self(), mine),
    {noreply, {N + 1, case is_prime(N) of true -> [N | Ps]; false -> Ps end}}.
code_change(_, S, _) -> {ok, S}.
is_prime(N) when N < 2 -> false;
is_prime(N) -> lists:all(fun(D) -> N rem D =/= 0 end, lists:seq(2, trunc(math:sqrt(N)))).
"#;

/// v2 keeps a map; its code_change converts both ways.
const PM_V2: &str = r#"-module(pm).
-behaviour(gen_server).
-export([start_link/0, primes/0, init/1, handle_call/3, handle_cast/2, handle_info/2, code_change/3]).
start_link() -> gen_server:start_link({local, pm}, ?MODULE, [], []).
primes() -> gen_server:call(pm, primes).
init([]) -> self() ! mine, {ok, #{next => 2, primes => []}}.
handle_call(primes, _, #{primes := Ps} = S) -> {reply, lists:reverse(Ps), S};
handle_call(format, _, S) -> {reply, map, S}.
handle_cast(_, S) -> {noreply, S}.
handle_info(mine, #{next := N, primes := Ps} = S) ->
    erlang:send_after(2, self(), mine),
    {noreply, S#{next := N + 1, primes := case is_prime(N) of true -> [N | Ps]; false -> Ps end}}.
code_change({down, _}, #{next := N, primes := Ps}, _) -> {ok, {N, Ps}};
code_change(_, {N, Ps}, _) -> {ok, #{next => N, primes => Ps}}.
is_prime(N) when N < 2 -> false;
is_prime(N) -> lists:all(fun(D) -> N rem D =/= 0 end, lists:seq(2, trunc(math:sqrt(N)))).
"#;

const APPUP_V2: &str = r#"{"0.2.0",
 [{"0.1.0", [{update, pm, {advanced, []}}, {update, tally, {advanced, []}},
             {update, pm_idle, {advanced, []}}]}],
 [{"0.1.0", [{update, pm, {advanced, []}}, {update, tally, {advanced, []}},
             {update, pm_idle, {advanced, []}}]}]}.
"#;

/// v3: v2's code whose code_change crashes, whichever way it is called.
const PM_V3: &str = r#"-module(pm).
-behaviour(gen_server).
-export([start_link/0, primes/0, init/1, handle_call/3, handle_cast/2, handle_info/2, code_change/3]).
start_link() -> gen_server:start_link({local, pm}, ?MODULE, [], []).
primes() -> gen_server:call(pm, primes).
init([]) -> self() ! mine, {ok, #{next => 2, primes => []}}.
handle_call(primes, _, #{primes := Ps} = S) -> {reply, lists:reverse(Ps), S};
handle_call(format, _, S) -> {reply, map3, S}.
handle_cast(_, S) -> {noreply, S}.
handle_info(mine, #{next := N, primes := Ps} = S) ->
    erlang:send_after(2, self(), mine),
    {noreply, S#{next := N + 1, primes := case is_prime(N) of true -> [N | Ps]; false -> Ps end}}.
code_change(_, _, _) -> erlang:error(code_change_crashed).
is_prime(N) when N < 2 -> false;
is_prime(N) -> lists:all(fun(D) -> N rem D =/= 0 end, lists:seq(2, trunc(math:sqrt(N)))).
"#;

const APPUP_V3: &str = r#"{"0.3.0",
 [{"0.2.0", [{update, pm, {advanced, []}}]}],
 [{"0.2.0", [{update, pm, {advanced, []}}]}]}.
"#;

/// The tarballs a test needs.
#[derive(Debug)]
pub struct Tarballs {
    /// `pm-0.1.0.tar.gz`: what the nodes start from.
    pub v1: PathBuf,
    /// `pm-0.2.0.tar.gz` with its relup from 0.1.0.
    pub v2: PathBuf,
    /// `pm-0.1.1.tar.gz` (v1's code, built first): a version the relup does not upgrade from.
    pub other: PathBuf,
}

/// Write the project under `dir` and build the tarballs (rebar3 offline, HOME in `dir`).
pub fn build(dir: &Path) -> anyhow::Result<Tarballs> {
    let project = dir.join("pm");
    let app = project.join("apps/pm");
    std::fs::create_dir_all(app.join("src"))?;
    std::fs::create_dir_all(app.join("ebin"))?;
    std::fs::create_dir_all(project.join("config"))?;
    std::fs::write(project.join("config/vm.args.src"), VM_ARGS_SRC)?;
    std::fs::write(
        project.join("config/sys.config.src"),
        "[{pm, [{started_by, \"${NODE_NAME}\"}]}].\n",
    )?;
    std::fs::write(app.join("src/pm_app.erl"), PM_APP)?;
    std::fs::write(app.join("src/pm_sup.erl"), PM_SUP)?;
    let rel = project.join("_build/prod/rel/pm");
    let home = dir.join("home");
    std::fs::create_dir_all(&home)?;
    let version = |vsn: &str, [pm, tally, idle]: [&str; 3]| -> anyhow::Result<()> {
        std::fs::write(
            project.join("rebar.config"),
            REBAR_CONFIG.replace("@VSN@", vsn),
        )?;
        std::fs::write(app.join("src/pm.app.src"), APP_SRC.replace("@VSN@", vsn))?;
        std::fs::write(app.join("src/pm.erl"), pm)?;
        std::fs::write(app.join("src/tally.erl"), tally)?;
        std::fs::write(app.join("src/pm_idle.erl"), idle)?;
        rebar3(&project, &home, &["as", "prod", "release"])
    };
    let v1 = [PM_V1, TALLY_V1, PM_IDLE_V1];
    version("0.1.1", v1)?;
    rebar3(&project, &home, &["as", "prod", "tar"])?;
    version("0.1.0", v1)?;
    rebar3(&project, &home, &["as", "prod", "tar"])?;
    // rebar3 copies an app's ebin/*.appup into the release; relup reads it from there.
    std::fs::write(app.join("ebin/pm.appup"), APPUP_V2)?;
    version("0.2.0", [PM_V2, TALLY_V2, PM_IDLE_V2])?;
    rebar3(
        &project,
        &home,
        &[
            "as", "prod", "relup", "-n", "pm", "-v", "0.2.0", "-u", "0.1.0",
        ],
    )?;
    rebar3(&project, &home, &["as", "prod", "tar"])?;
    let out = dir.join("tarballs");
    std::fs::create_dir_all(&out)?;
    let take = |vsn: &str| -> anyhow::Result<PathBuf> {
        let name = format!("pm-{vsn}.tar.gz");
        let to = out.join(&name);
        std::fs::copy(rel.join(&name), &to).with_context(|| format!("no {name} built"))?;
        Ok(to)
    };
    Ok(Tarballs {
        v1: take("0.1.0")?,
        v2: take("0.2.0")?,
        other: take("0.1.1")?,
    })
}

/// After [`build`] in the same `dir`: `pm-0.3.0.tar.gz`, whose relup upgrades from 0.2.0 and
/// whose `code_change` crashes.
pub fn build_v3(dir: &Path) -> anyhow::Result<PathBuf> {
    let project = dir.join("pm");
    let app = project.join("apps/pm");
    let home = dir.join("home");
    std::fs::write(
        project.join("rebar.config"),
        REBAR_CONFIG.replace("@VSN@", "0.3.0"),
    )?;
    std::fs::write(
        app.join("src/pm.app.src"),
        APP_SRC.replace("@VSN@", "0.3.0"),
    )?;
    std::fs::write(app.join("src/pm.erl"), PM_V3)?;
    std::fs::write(app.join("ebin/pm.appup"), APPUP_V3)?;
    rebar3(&project, &home, &["as", "prod", "release"])?;
    rebar3(
        &project,
        &home,
        &[
            "as", "prod", "relup", "-n", "pm", "-v", "0.3.0", "-u", "0.2.0",
        ],
    )?;
    rebar3(&project, &home, &["as", "prod", "tar"])?;
    let name = "pm-0.3.0.tar.gz";
    let to = dir.join("tarballs").join(name);
    std::fs::copy(project.join("_build/prod/rel/pm").join(name), &to)
        .with_context(|| format!("no {name} built"))?;
    Ok(to)
}

fn rebar3(project: &Path, home: &Path, args: &[&str]) -> anyhow::Result<()> {
    let mut command = Command::new("rebar3");
    command
        .args(args)
        .current_dir(project)
        .env("HOME", home)
        .env("REBAR_OFFLINE", "1")
        .env("QUIET", "1");
    let output = run_command(command, Duration::from_secs(180))?;
    ensure!(
        output.code == Some(0),
        "rebar3 {} failed: {}{}",
        args.join(" "),
        output.stdout,
        output.stderr
    );
    Ok(())
}

/// One node started from a release tarball with `bin/pm daemon`; killed on drop.
#[derive(Debug)]
pub struct ReleaseNode {
    /// The release root (bin/, lib/, releases/).
    pub root: PathBuf,
    /// For `eval` and the cookie (its `start` is not used: relx's script starts this node).
    pub erl: ErlNode,
}

impl ReleaseNode {
    /// Unpack `tarball` into `<dir>/rel` and start `short@127.0.0.1` from it.
    pub fn start(
        dir: &Path,
        short: &str,
        tarball: &Path,
        cookie: &str,
        epmd_port: u16,
    ) -> anyhow::Result<Self> {
        let root = dir.join("rel");
        std::fs::create_dir_all(&root)?;
        let mut untar = Command::new("tar");
        untar.arg("xzf").arg(tarball).arg("-C").arg(&root);
        let out = run_command(untar, Duration::from_secs(60))?;
        ensure!(out.code == Some(0), "tar: {}", out.stderr);
        let cookie_file = dir.join("cookie");
        std::fs::write(&cookie_file, cookie)?;
        let name = format!("{short}@127.0.0.1");
        let node = Self {
            erl: ErlNode {
                name: name.clone(),
                dir: dir.to_path_buf(),
                code_dir: root.join("lib"),
                cookie_file,
                cookie: cookie.to_string(),
                epmd_port,
                start: Vec::new(),
            },
            root,
        };
        let log = std::fs::File::create(dir.join("daemon.log"))?;
        let mut daemon = Command::new(node.root.join("bin/pm"));
        daemon
            .arg("daemon")
            .env("NODE_NAME", &name)
            .env("COOKIE", cookie)
            .env("ERL_EPMD_PORT", epmd_port.to_string())
            .env("HOME", dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut child = daemon.spawn().context("cannot run bin/pm daemon")?;
        // `daemon` returns once run_erl has the node going.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                ensure!(status.success(), "bin/pm daemon failed: {status}");
                break;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("bin/pm daemon did not return");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        node.wait_running(Duration::from_secs(30))?;
        Ok(node)
    }

    pub fn name(&self) -> &str {
        &self.erl.name
    }

    /// Wait until `pm` answers, then remember the OS pid (the guard kills it).
    pub fn wait_running(&self, timeout: Duration) -> anyhow::Result<()> {
        poll(
            &format!("{} to run pm", self.erl.name),
            timeout,
            Duration::from_millis(100),
            || self.erl.eval("length(pm:primes()).").map(|_| Some(())),
        )
        .with_context(|| format!("daemon log: {}", self.daemon_log()))?;
        self.remember_pid()
    }

    fn remember_pid(&self) -> anyhow::Result<()> {
        let pid = self.erl.eval("os:getpid().")?;
        std::fs::write(self.erl.dir.join("node.pid"), pid.trim_matches('"'))?;
        Ok(())
    }

    pub fn eval(&self, expr: &str) -> anyhow::Result<String> {
        self.erl.eval(expr)
    }

    fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.erl.dir.join("daemon.log")).unwrap_or_default()
    }

    /// `release_handler:which_releases()` as `(version, status)` pairs.
    pub fn which_releases(&self) -> anyhow::Result<Vec<(String, String)>> {
        let text = self.eval(
            "lists:flatten([io_lib:format(\"~s ~s;\", [V, S]) || {_, V, _, S} <- release_handler:which_releases()]).",
        )?;
        Ok(text
            .trim_matches('"')
            .split(';')
            .filter_map(|pair| {
                let (v, s) = pair.trim().split_once(' ')?;
                Some((v.to_string(), s.to_string()))
            })
            .collect())
    }

    /// The miner's pid, state format and primes.
    pub fn miner(&self) -> anyhow::Result<Miner> {
        let primes = self.eval("pm:primes().")?;
        let primes = primes
            .trim_matches(['[', ']'])
            .split(',')
            .filter_map(|p| p.trim().parse().ok())
            .collect();
        Ok(Miner {
            pid: self.eval("pid_to_list(whereis(pm)).")?,
            format: self.eval("gen_server:call(pm, format).")?,
            primes,
        })
    }
}

impl ReleaseNode {
    /// The unsupervised `tally` gen_server: its pid, state format and count.
    pub fn tally(&self) -> anyhow::Result<Tally> {
        Ok(Tally {
            pid: self.eval("pid_to_list(whereis(tally)).")?,
            format: self.eval("gen_server:call(tally, format).")?,
            count: self.eval("gen_server:call(tally, count).")?.parse()?,
        })
    }

    /// Bump `tally` `times` times; its count afterwards.
    pub fn bump_tally(&self, times: usize) -> anyhow::Result<u64> {
        let count = self.eval(&format!(
            "lists:last([gen_server:call(tally, bump) || _ <- lists:seq(1, {times})])."
        ))?;
        Ok(count.parse()?)
    }
}

/// What a test reads from `tally`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tally {
    pub pid: String,
    /// `integer` (v1) or `map` (v2).
    pub format: String,
    pub count: u64,
}

impl Drop for ReleaseNode {
    fn drop(&mut self) {
        // The node may have been restarted (a rollback by restart): ask it for its pid again.
        let _ = self.remember_pid();
        self.erl.kill();
    }
}

/// What a test reads from the prime miner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Miner {
    pub pid: String,
    /// `tuple` (v1) or `map` (v2).
    pub format: String,
    pub primes: Vec<u64>,
}

/// `v2` repacked broken: no relup, and a `sys.config.src` that does not parse.
pub fn broken_tarball(v2: &Path, out: &Path) -> anyhow::Result<PathBuf> {
    repack(v2, out, "broken", |tree| {
        std::fs::remove_file(tree.join("releases/0.2.0/relup"))?;
        std::fs::write(
            tree.join("releases/0.2.0/sys.config.src"),
            "[{pm, [{started_by, \"${NODE_NAME}\"}}].\n",
        )?;
        Ok(())
    })
}

/// `v2` repacked with OTP's own `sync_nodes` right after the relup's point_of_no_return.
pub fn sync_nodes_tarball(v2: &Path, out: &Path) -> anyhow::Result<PathBuf> {
    repack(v2, out, "sync-nodes", |tree| {
        let path = tree.join("releases/0.2.0/relup");
        let relup = std::fs::read_to_string(&path)?;
        ensure!(relup.contains("point_of_no_return"), "relup: {relup}");
        let edited = relup.replacen(
            "point_of_no_return",
            "point_of_no_return,{sync_nodes,hotroll_test,['pm-node-1@127.0.0.1']}",
            1,
        );
        std::fs::write(&path, edited)?;
        Ok(())
    })
}

/// `v2` repacked with a `vm.args.src` that names one fixed node for the whole fleet (the
/// mistake the per-node identity check is for).
pub fn fixed_name_tarball(v2: &Path, out: &Path) -> anyhow::Result<PathBuf> {
    repack(v2, out, "fixed-name", |tree| {
        let path = tree.join("releases/0.2.0/vm.args.src");
        let text = std::fs::read_to_string(&path)?;
        ensure!(text.contains("${NODE_NAME}"), "vm.args.src: {text}");
        std::fs::write(&path, text.replace("${NODE_NAME}", "pm-fixed@127.0.0.1"))?;
        Ok(())
    })
}

/// `v2` unpacked under `out/<tag>-tree`, changed by `edit`, packed as `pm-0.2.0-<tag>.tar.gz`.
fn repack(
    v2: &Path,
    out: &Path,
    tag: &str,
    edit: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<PathBuf> {
    let tree = out.join(format!("{tag}-tree"));
    std::fs::create_dir_all(&tree)?;
    let mut untar = Command::new("tar");
    untar.arg("xzf").arg(v2).arg("-C").arg(&tree);
    let done = run_command(untar, Duration::from_secs(60))?;
    ensure!(done.code == Some(0), "tar: {}", done.stderr);
    edit(&tree)?;
    let tarball = out.join(format!("pm-0.2.0-{tag}.tar.gz"));
    let mut tar = Command::new("tar");
    tar.arg("czf")
        .arg(&tarball)
        .arg("-C")
        .arg(&tree)
        .args(["bin", "lib", "releases"]);
    let done = run_command(tar, Duration::from_secs(60))?;
    ensure!(done.code == Some(0), "tar: {}", done.stderr);
    Ok(tarball)
}
