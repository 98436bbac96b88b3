%% hotroll test fixture, version 3: like version 2, but its code_change from "1" crashes on a
%% node started with `-counter fail_code_change true`.
-module(counter_server).
-behaviour(gen_server).
-vsn("3").
-export([start_link/0, incr/0, get/0]).
-export([init/1, handle_call/3, handle_cast/2, code_change/3]).

start_link() -> gen_server:start_link({local, ?MODULE}, ?MODULE, [], []).

incr() -> gen_server:call(?MODULE, incr).
get() -> gen_server:call(?MODULE, get).

init([]) -> {ok, {state, 0, v3}}.

handle_call(incr, _From, {state, N, Note}) -> {reply, N + 1, {state, N + 1, Note}};
handle_call(get, _From, {state, N, _} = S) -> {reply, N, S};
handle_call(version, _From, S) -> {reply, 3, S}.

handle_cast(_Msg, S) -> {noreply, S}.

code_change("1", {state, N}, _Extra) ->
    case application:get_env(counter, fail_code_change) of
        {ok, true} -> erlang:error(code_change_refused);
        _ -> {ok, {state, N, v3}}
    end;
code_change({down, "1"}, {state, N, _}, _Extra) ->
    {ok, {state, N}}.
