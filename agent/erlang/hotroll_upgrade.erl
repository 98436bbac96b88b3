%% hotroll_upgrade: the in-node half of hotroll's BEAM runtime.
%%
%% The agent loads this module into the Erlang node it drives (code:load_binary, from the compiled
%% hotroll_upgrade.beam committed next to this file) and calls it through the distribution
%% protocol. Everything here takes data as arguments: the agent never sends code to evaluate.
%%
%% The heart is run_group/2: the suspend -> load -> code_change -> resume sequence of a group of
%% modules in ONE call, so that an agent that dies (or a connection that drops) in the middle can
%% never leave a process suspended. The calling process is not linked to the caller, resume is in
%% an `after`, and when a load or a code_change fails every step already done is undone in reverse
%% (code_change the other way, old binary reloaded) before the processes are resumed: they go on
%% with their old code and their old state. The suspend -> resume window is measured here with
%% erlang:monotonic_time and returned.
%%
%% Regenerate the .beam after editing (the agent's tests check it is up to date):
%%   erlc +deterministic -o agent/erlang agent/erlang/hotroll_upgrade.erl
-module(hotroll_upgrade).

-export([version/0,
         check_binary/2,
         check_old_code/1,
         run_group/2,
         install_release/5,
         purge/2,
         stop_child/2,
         start_child/2,
         restart_child/2,
         status/1]).

%% Bump together with HELPER_VERSION in agent/src/runtime/beam/helper.rs.
-define(VERSION, 3).

%% Only one group runs at a time on a node: a second caller (an agent that restarted while the
%% first call still runs, a rollback after a timeout) waits for the first to finish.
-define(LOCK, hotroll_upgrade_lock).

version() -> ?VERSION.

%% ---------------------------------------------------------------------------------------------
%% Staging and checks (no change to the running system)

%% The binary is a BEAM file of module Mod. Returns {ok, VsnText}.
check_binary(Mod, Bin) when is_atom(Mod), is_binary(Bin) ->
    case beam_lib:info(Bin) of
        {error, beam_lib, Reason} ->
            {error, fmt("not a BEAM file: ~0p", [Reason])};
        Info ->
            case proplists:get_value(module, Info) of
                Mod -> {ok, fmt("~0p", [vsn_of(Bin)])};
                Other -> {error, fmt("the file holds module ~0p, not ~0p", [Other, Mod])}
            end
    end.

%% Modules whose old code is still run by some process: loading a new version would make a
%% soft purge fail (and a hard one kill those processes). Returns ok | {error, Text}.
check_old_code(Mods) when is_list(Mods) ->
    Busy = [{M, old_code_users(M)} || M <- Mods, erlang:check_old_code(M)],
    case [{M, Ps} || {M, Ps} <- Busy, Ps =/= []] of
        [] -> ok;
        InUse -> {error, fmt("old code still in use: ~0p", [InUse])}
    end.

old_code_users(Mod) ->
    [P || P <- erlang:processes(), erlang:check_process_code(P, Mod)].

%% ---------------------------------------------------------------------------------------------
%% The group

%% Spec = {SuspendMods, Ops, SuspendTimeoutMs, ChangeTimeoutMs}
%%   Ops, in script order:
%%     {load, Mod, File, Bin}
%%     {code_change, [Mod], ExtraText, up | down}
%%     {downgrade, Mod, File, OldBin, ExtraText, Change}: back to OldBin unless it already runs
%%         (code_change down first when Change, then load): the rollback of an upgrade that may
%%         or may not have happened (an agent that restarted in the middle of one).
%% Returns {ok, WindowUs, Suspended, Report, Warnings} | {error, Text, WindowUs, Suspended, Report}.
%% Warnings (binaries) name each module whose code_change reached no process although it exports
%% code_change/3: whatever runs it unseen keeps its old state, so the agent records a warning.
run_group(Spec, LockTimeoutMs) ->
    with_lock(fun() -> group(Spec) end, LockTimeoutMs).

group({SuspendMods, Ops, SuspendTimeout, ChangeTimeout}) ->
    try prepare(Ops) of
        Prepared ->
            %% The supervision trees are read once, before anything is suspended: finding the
            %% modules of a `dynamic` child asks the process itself, which must not be suspended.
            Changed = [M || {code_change, Vsns, _, _} <- Prepared, {M, _} <- Vsns],
            All = known_procs(lists:usort(SuspendMods ++ Changed)),
            Procs = procs_of(SuspendMods, All),
            T0 = erlang:monotonic_time(microsecond),
            case suspend_all(Procs, SuspendTimeout) of
                {error, Pids, Why} ->
                    %% Nothing changed yet.
                    resume_all(Pids),
                    T1 = erlang:monotonic_time(microsecond),
                    {error, Why, T1 - T0, length(Pids), <<>>};
                {ok, Pids} ->
                    Result = try apply_ops(Prepared, All, ChangeTimeout)
                             catch Class:Reason ->
                                     {error, fmt("the upgrade crashed: ~0p:~0p", [Class, Reason])}
                             after
                                 resume_all(Pids)
                             end,
                    T1 = erlang:monotonic_time(microsecond),
                    case Result of
                        {ok, Report} ->
                            {ok, T1 - T0, length(Pids), Report, unreached(Changed, All)};
                        {error, Why} -> {error, Why, T1 - T0, length(Pids), <<>>}
                    end
            end
    catch
        throw:{hotroll, Why} -> {error, Why, 0, 0, <<>>}
    end.

%% The warnings of a group: code_change modules that exported code_change/3 and ran in no
%% process found.
unreached(Mods, All) ->
    [fmt("code_change of ~0p reached no process (it exports code_change/3: a process running it "
         "that neither a supervisor nor proc_lib names would keep its old state)", [M])
     || M <- lists:usort(Mods), procs_running(M, All) =:= [],
        erlang:function_exported(M, code_change, 3)].

%% ---------------------------------------------------------------------------------------------
%% release_handler:install_release/2 and the processes it does not see

%% The release handler finds the processes of a `code_change` through the supervision trees
%% only. Here the processes running one of the relup's code_change modules that no supervisor
%% knows (a registered gen_server started by hand, a process under a non-OTP parent) are
%% suspended before the relup runs, code_changed with the relup's own Extra once it has run
%% (the old version read before, as release_handler_1 does; `{down, Vsn}` of the loaded code on
%% a downgrade), and resumed in any case.
%%   Relup: the relup file release_handler is about to run; Entry: {up, FromVsn} (an UpFrom
%%   entry of the new release's relup) or {down, ToVsn} (a DownTo entry of the current one's).
%% Returns {Answer, Changed, Warnings, Failures}: Answer is install_release's own; Changed the
%% unsupervised processes converted, as text; Warnings as run_group's (supervised processes
%% count as reached); Failures one text per unsupervised process whose code_change failed.
install_release(Vsn, Opts, Relup, Entry, Timeout) ->
    with_lock(fun() -> install(to_list(Vsn), Opts, to_list(Relup), Entry, Timeout) end, Timeout).

install(Vsn, Opts, Relup, Entry, Timeout) ->
    {Mode, Changes} = relup_changes(Relup, Entry),
    Mods = lists:usort([M || {M, _} <- Changes]),
    All = known_procs(Mods),
    Unsupervised = [{Pid, M} || {none, _Name, Pid, [M]} <- All],
    OldVsns = [{M, catch current_vsn(M)} || M <- Mods],
    Pids = lists:usort([P || {P, _} <- Unsupervised]),
    case suspend_all(Pids, Timeout) of
        {error, Suspended, Why} ->
            resume_all(Suspended),
            {{error, Why}, <<>>, [], []};
        {ok, Suspended} ->
            try release_handler:install_release(Vsn, Opts) of
                {ok, _, _} = Ok ->
                    Results = convert(Unsupervised, Changes, Mode, OldVsns, Timeout),
                    Changed = [{Pid, M} || {Pid, M, ok} <- Results],
                    Failed = [fmt("code_change of ~0p in ~0p (not supervised) failed: ~0p; the "
                                  "process was stopped rather than left with a state its code "
                                  "cannot read", [M, Pid, Why])
                              || {Pid, M, {killed, Why}} <- Results],
                    {Ok, fmt("~0p", [Changed]), unreached(Mods, All), Failed};
                Other ->
                    {Other, <<>>, [], []}
            after
                resume_all(Suspended)
            end
    end.

%% The code_change instructions of one relup entry: {up | down, [{Mod, Extra}]}.
relup_changes(Relup, {Dir, Other}) ->
    Other1 = to_list(Other),
    case file:consult(Relup) of
        {ok, [{_Vsn, UpFrom, DownTo}]} ->
            Entries = case Dir of up -> UpFrom; down -> DownTo end,
            case [Instrs || {V, _Descr, Instrs} <- Entries, V =:= Other1] of
                [Instrs | _] ->
                    {Dir, [{M, X} || {code_change, _, MXs} <- Instrs, {M, X} <- MXs]};
                [] -> {Dir, []}
            end;
        _ -> {Dir, []}
    end.

convert(Unsupervised, Changes, Mode, OldVsns, Timeout) ->
    [{Pid, Mod, change_one(Pid, Mod, Extra, Mode, OldVsns, Timeout)}
     || {Pid, Mod} <- Unsupervised, {M, Extra} <- Changes, M =:= Mod].

change_one(Pid, Mod, Extra, Mode, OldVsns, Timeout) ->
    Arg = case Mode of
              up -> proplists:get_value(Mod, OldVsns);
              down -> {down, catch current_vsn(Mod)}
          end,
    case catch sys:change_code(Pid, Mod, Arg, Extra, Timeout) of
        ok -> ok;
        Error ->
            %% Its state no longer matches its code: stopping it is the only honest outcome
            %% (it is nobody's child, so nothing restarts it with a state it cannot read).
            %% The same holds on the way down: a rollback whose code_change fails stops the
            %% process too and reports it as killed; the rollback cannot bring it back.
            exit(Pid, kill),
            {killed, Error}
    end.

%% Everything that can fail without touching the system: old object code saved for undo, old
%% versions read (release_handler_1:get_current_vsn semantics), extras parsed, old code purgeable.
prepare(Ops) ->
    lists:append([prepare_op(Op, Ops) || Op <- Ops]).

prepare_op({downgrade, Mod, File, Bin, ExtraText, Change}, _Ops)
  when is_atom(Mod), is_binary(Bin) ->
    case runs(Mod, Bin) of
        true -> [];
        false ->
            Down = case Change andalso code:is_loaded(Mod) =/= false of
                       true -> [{code_change, [{Mod, vsn_of(Bin)}], parse_extra(ExtraText), down}];
                       false -> []
                   end,
            Down ++ prepare_op({load, Mod, File, Bin}, [])
    end;
prepare_op({load, Mod, File, Bin}, _Ops) when is_atom(Mod), is_binary(Bin) ->
    case check_binary(Mod, Bin) of
        {ok, _} -> ok;
        {error, Why} -> throw({hotroll, Why})
    end,
    Previous = previous_code(Mod),
    case code:soft_purge(Mod) of
        true -> ok;
        false -> throw({hotroll, fmt("~0p: old code is still in use by ~0p; purge it first",
                                     [Mod, old_code_users(Mod)])})
    end,
    [{load, Mod, to_list(File), Bin, Previous}];
prepare_op({code_change, Mods, ExtraText, Mode}, Ops) when is_list(Mods) ->
    Extra = parse_extra(ExtraText),
    Vsns = [{M, change_vsn(M, Mode, Ops)} || M <- Mods],
    [{code_change, Vsns, Extra, Mode}].

%% Whether the code of Mod loaded now is the code in Bin.
runs(Mod, Bin) ->
    case {code:is_loaded(Mod), beam_lib:md5(Bin)} of
        {false, _} -> false;
        {_, {ok, {_, MD5}}} -> (catch Mod:module_info(md5)) =:= MD5;
        _ -> false
    end.

%% Up: the version of the code running now (what release_handler_1:get_current_vsn/1 returns).
%% Down: the version being returned to, i.e. of the binary this group loads for the module.
change_vsn(Mod, up, _Ops) ->
    current_vsn(Mod);
change_vsn(Mod, down, Ops) ->
    case [Bin || {load, M, _, Bin} <- Ops, M =:= Mod] of
        [Bin | _] -> vsn_of(Bin);
        [] -> current_vsn(Mod)
    end.

current_vsn(Mod) ->
    try release_handler_1:get_current_vsn(Mod)
    catch _:_ ->
        Attrs = try Mod:module_info(attributes) catch _:_ -> [] end,
        case proplists:get_value(vsn, Attrs) of
            undefined -> throw({hotroll, fmt("~0p: cannot tell its current version", [Mod])});
            V -> norm_vsn(V)
        end
    end.

vsn_of(Bin) ->
    case beam_lib:version(Bin) of
        {ok, {_, V}} -> norm_vsn(V);
        _ -> undefined
    end.

norm_vsn(V) ->
    case io_lib:printable_list(V) of
        true -> V;
        false when is_list(V), length(V) =:= 1 -> hd(V);
        false -> V
    end.

%% The code to reload if the group has to be undone: none | {File, Bin}.
previous_code(Mod) ->
    case code:is_loaded(Mod) of
        false -> none;
        {file, _} ->
            case code:which(Mod) of
                Path when is_list(Path) ->
                    case file:read_file(Path) of
                        {ok, Bin} -> {Path, Bin};
                        {error, E} ->
                            throw({hotroll, fmt("~0p: cannot read its current object code ~ts: ~0p",
                                                [Mod, Path, E])})
                    end;
                Other ->
                    throw({hotroll, fmt("~0p: its current code has no object file (~0p)",
                                        [Mod, Other])})
            end
    end.

parse_extra(Text) ->
    case string:trim(to_list(Text)) of
        "" -> [];
        Str ->
            case erl_scan:string(Str ++ ".") of
                {ok, Tokens, _} ->
                    case erl_parse:parse_term(Tokens) of
                        {ok, Term} -> Term;
                        {error, _} -> throw({hotroll, fmt("extra ~0p is not an Erlang term", [Str])})
                    end;
                _ -> throw({hotroll, fmt("extra ~0p is not an Erlang term", [Str])})
            end
    end.

%% Processes that run one of Mods, found through the supervision trees as the release handler
%% does (release_handler_1:get_supervised_procs/0: children whose `modules` list names them,
%% `dynamic` resolved by asking the process).
procs_of([], _All) -> [];
procs_of(Mods, All) ->
    lists:usort([Pid || {_Sup, _Name, Pid, PMods} <- All, is_pid(Pid),
                        lists:any(fun(M) -> lists:member(M, PMods) end, Mods)]).

supervised() ->
    try release_handler_1:get_supervised_procs()
    catch _:_ -> []
    end.

%% The supervised processes, plus the ones running one of Mods that no supervisor knows (the
%% release handler does not see them): a registered gen_server started by hand, a process under
%% a non-OTP parent. Any proc_lib process (gen_server, gen_statem, ..) whose initial call is one
%% of Mods' is taken, as `{none, Name, Pid, [Mod]}`.
known_procs(Mods) ->
    Sup = supervised(),
    Known = [P || {_, _, P, _} <- Sup, is_pid(P)],
    Sup ++ [{none, registered_name(P), P, [M]}
            || P <- erlang:processes(), P =/= self(), not lists:member(P, Known),
               M <- [initial_module(P)], lists:member(M, Mods)].

initial_module(Pid) ->
    case erlang:process_info(Pid, dictionary) of
        {dictionary, Dict} ->
            case lists:keyfind('$initial_call', 1, Dict) of
                {_, {M, _, _}} when is_atom(M) -> M;
                _ -> none
            end;
        _ -> none
    end.

registered_name(Pid) ->
    case erlang:process_info(Pid, registered_name) of
        {registered_name, Name} -> Name;
        _ -> undefined
    end.

procs_running(Mod, All) ->
    [Pid || {_Sup, _Name, Pid, PMods} <- All, is_pid(Pid), lists:member(Mod, PMods)].

suspend_all(Pids, Timeout) ->
    suspend_all(Pids, Timeout, []).

suspend_all([], _Timeout, Done) ->
    {ok, lists:reverse(Done)};
suspend_all([Pid | Rest], Timeout, Done) ->
    try sys:suspend(Pid, Timeout) of
        ok -> suspend_all(Rest, Timeout, [Pid | Done])
    catch
        exit:{noproc, _} ->
            %% Gone since it was found (e.g. a transient worker that finished): nothing to do.
            suspend_all(Rest, Timeout, Done);
        Class:Reason ->
            %% The call may have timed out after the process got the message: it may be
            %% suspended, so resume it too.
            {error, lists:reverse([Pid | Done]),
             fmt("cannot suspend ~0p: ~0p:~0p", [Pid, Class, Reason])}
    end.

resume_all(Pids) ->
    _ = [catch sys:resume(Pid, 5000) || Pid <- Pids],
    ok.

%% Apply Ops in order; on the first failure undo what was done, in reverse.
apply_ops(Ops, All, ChangeTimeout) ->
    apply_ops(Ops, All, ChangeTimeout, [], []).

apply_ops([], _All, _T, _Done, Report) ->
    {ok, fmt("~0p", [lists:reverse(Report)])};
apply_ops([{load, Mod, File, Bin, _Previous} = Op | Rest], All, T, Done, Report) ->
    case code:load_binary(Mod, File, Bin) of
        {module, Mod} -> apply_ops(Rest, All, T, [Op | Done], [{loaded, Mod} | Report]);
        {error, Why} ->
            undo(Done, T),
            {error, fmt("load of ~0p failed: ~0p", [Mod, Why])}
    end;
apply_ops([{code_change, Vsns, Extra, Mode} | Rest], All, T, Done, Report) ->
    case change(Vsns, All, Extra, Mode, T, []) of
        {ok, Changed} ->
            apply_ops(Rest, All, T, [{changed, Changed, Extra, Mode} | Done],
                      [{code_change, Mode, [{M, P} || {P, M, _} <- Changed]} | Report]);
        {error, Changed, Why} ->
            undo([{changed, Changed, Extra, Mode} | Done], T),
            {error, Why}
    end.

change([], _All, _Extra, _Mode, _T, Changed) ->
    {ok, Changed};
change([{Mod, Vsn} | Rest], All, Extra, Mode, T, Changed) ->
    Arg = case Mode of up -> Vsn; down -> {down, Vsn} end,
    case change_pids(procs_running(Mod, All), Mod, Arg, Extra, T, Changed) of
        {ok, Changed2} -> change(Rest, All, Extra, Mode, T, Changed2);
        {error, _, _} = E -> E
    end.

change_pids([], _Mod, _Arg, _Extra, _T, Changed) ->
    {ok, Changed};
change_pids([Pid | Rest], Mod, Arg, Extra, T, Changed) ->
    case catch sys:change_code(Pid, Mod, Arg, Extra, T) of
        ok -> change_pids(Rest, Mod, Arg, Extra, T, [{Pid, Mod, Arg} | Changed]);
        Error ->
            {error, Changed, fmt("code_change of ~0p in ~0p (old version ~0p) failed: ~0p",
                                 [Mod, Pid, Arg, Error])}
    end.

%% Undo in reverse order (Done is most recent first).
undo([], _T) -> ok;
undo([{changed, Changed, Extra, _Mode} | Rest], T) ->
    %% The new code is still loaded here (loads are undone after): ask it to convert back. A
    %% process whose state cannot be converted back is killed so its supervisor restarts it on
    %% the old code; its state is lost but it does not run with a state its code cannot read.
    _ = [case catch sys:change_code(Pid, Mod, opposite(Arg), Extra, T) of
             ok -> ok;
             _ -> exit(Pid, kill)
         end || {Pid, Mod, Arg} <- Changed],
    undo(Rest, T);
undo([{load, Mod, _File, _Bin, Previous} | Rest], T) ->
    %% The code loaded by the group is current, the previous one is old: drop the previous
    %% (nobody runs it: the soft purge before loading left none, and suspended processes wait
    %% in sys), then load it again from its saved object code.
    _ = code:soft_purge(Mod),
    case Previous of
        none ->
            _ = code:delete(Mod),
            _ = code:soft_purge(Mod);
        {Path, Bin} ->
            {module, Mod} = code:load_binary(Mod, Path, Bin)
    end,
    undo(Rest, T).

opposite({down, Vsn}) -> Vsn;
opposite(Vsn) -> {down, Vsn}.

%% ---------------------------------------------------------------------------------------------
%% Purge, supervisor children, status

%% Soft purge (or hard, when Brutal) of the old code of Mods. ok | {error, Text}.
purge(Mods, Brutal) when is_list(Mods) ->
    Left = case Brutal of
               true -> [M || M <- Mods, begin code:purge(M), erlang:check_old_code(M) end];
               false -> [M || M <- Mods, not code:soft_purge(M)]
           end,
    case Left of
        [] -> ok;
        _ -> {error, fmt("old code of ~0p is still in use (a brutal purge would kill ~0p)",
                         [Left, lists:usort(lists:append([old_code_users(M) || M <- Left]))])}
    end.

%% Supervisor children by id, given as a binary (never turned into an atom).
stop_child(Id, _Timeout) ->
    with_child(Id, fun(Sup, Child) -> supervisor:terminate_child(Sup, Child) end).

start_child(Id, _Timeout) ->
    with_child(Id, fun(Sup, Child) ->
                           case supervisor:restart_child(Sup, Child) of
                               {ok, _} -> ok;
                               {ok, _, _} -> ok;
                               {error, running} -> ok;
                               Other -> Other
                           end
                   end).

restart_child(Id, Timeout) ->
    case stop_child(Id, Timeout) of
        ok -> start_child(Id, Timeout);
        Other -> Other
    end.

with_child(Id, Fun) ->
    case find_child(Id) of
        {ok, Sup, Child} ->
            case Fun(Sup, Child) of
                ok -> ok;
                Other -> {error, fmt("~ts: ~0p", [Id, Other])}
            end;
        error -> {error, fmt("no supervisor child with id ~ts", [Id])}
    end.

find_child(Id) ->
    Tops = [Top || {App, _, _} <- application:which_applications(),
                   Top <- [top_supervisor(App)], is_pid(Top)],
    find_child(Id, Tops).

find_child(_Id, []) -> error;
find_child(Id, [Sup | Rest]) ->
    Children = try supervisor:which_children(Sup) catch _:_ -> [] end,
    case [C || {C, _, _, _} <- Children, id_matches(C, Id)] of
        [C | _] -> {ok, Sup, C};
        [] ->
            Subs = [P || {_, P, supervisor, _} <- Children, is_pid(P)],
            find_child(Id, Subs ++ Rest)
    end.

id_matches(C, Id) when is_atom(C) -> atom_to_binary(C, utf8) =:= Id;
id_matches(C, Id) -> iolist_to_binary(io_lib:format("~0p", [C])) =:= Id.

top_supervisor(App) ->
    try
        Master = application_controller:get_master(App),
        {Top, _Mod} = application_master:get_child(Master),
        Top
    catch _:_ -> undefined
    end.

%% For the agent's health check and tests: [{Mod, LoadedVsnText, OldCode, [{Pid, SysState}]}].
status(Mods) when is_list(Mods) ->
    [{M, fmt("~0p", [catch current_vsn(M)]), erlang:check_old_code(M),
      [{Pid, sys_state(Pid)} || Pid <- procs_running(M, All)]} || All <- [known_procs(Mods)], M <- Mods].

sys_state(Pid) ->
    case catch sys:get_status(Pid, 1000) of
        {status, _, _, [_PDict, SysState | _]} -> SysState;
        _ -> unknown
    end.

%% ---------------------------------------------------------------------------------------------
%% Helpers

with_lock(Fun, Timeout) ->
    Deadline = erlang:monotonic_time(millisecond) + Timeout,
    lock(Deadline),
    try Fun()
    after
        catch unregister(?LOCK)
    end.

lock(Deadline) ->
    case catch register(?LOCK, self()) of
        true -> ok;
        _ ->
            case whereis(?LOCK) of
                undefined -> lock(Deadline);
                Holder ->
                    Ref = erlang:monitor(process, Holder),
                    Left = max(0, Deadline - erlang:monotonic_time(millisecond)),
                    receive
                        {'DOWN', Ref, process, Holder, _} -> lock(Deadline)
                    after Left ->
                        erlang:demonitor(Ref, [flush]),
                        exit({hotroll_busy, Holder})
                    end
            end
    end.

to_list(B) when is_binary(B) -> unicode:characters_to_list(B);
to_list(L) when is_list(L) -> L.

fmt(Format, Args) ->
    unicode:characters_to_binary(io_lib:format(Format, Args)).
