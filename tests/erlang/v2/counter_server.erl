%% hotroll test fixture, version 2: the counter keeps a note of how it got its state.
%% State: {state, Count, Note}. code_change from "1" adds the note (Extra when it is an atom);
%% Extra = {delay, Ms} makes the migration take Ms milliseconds (to kill an agent meanwhile).
-module(counter_server).
-behaviour(gen_server).
-vsn("2").
-export([start_link/0, incr/0, get/0, describe/0]).
-export([init/1, handle_call/3, handle_cast/2, code_change/3]).

start_link() -> gen_server:start_link({local, ?MODULE}, ?MODULE, [], []).

incr() -> gen_server:call(?MODULE, incr).
get() -> gen_server:call(?MODULE, get).
describe() -> gen_server:call(?MODULE, describe).

init([]) -> {ok, {state, 0, fresh}}.

handle_call(incr, _From, {state, N, Note}) -> {reply, N + 1, {state, N + 1, Note}};
handle_call(get, _From, {state, N, _} = S) -> {reply, N, S};
handle_call(describe, _From, {state, N, Note} = S) -> {reply, counter_fmt:describe(N, Note), S};
handle_call(version, _From, S) -> {reply, 2, S}.

handle_cast(_Msg, S) -> {noreply, S}.

code_change("1", {state, N}, {delay, Ms}) ->
    timer:sleep(Ms),
    {ok, {state, N, migrated}};
code_change("1", {state, N}, Extra) when is_atom(Extra), Extra =/= [] ->
    {ok, {state, N, Extra}};
code_change("1", {state, N}, _Extra) ->
    {ok, {state, N, migrated}};
code_change({down, "1"}, {state, N, _Note}, _Extra) ->
    {ok, {state, N}}.
