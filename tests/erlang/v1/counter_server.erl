%% hotroll test fixture, version 1: a counter. State: {state, Count}.
-module(counter_server).
-behaviour(gen_server).
-vsn("1").
-export([start_link/0, incr/0, get/0]).
-export([init/1, handle_call/3, handle_cast/2, code_change/3]).

start_link() -> gen_server:start_link({local, ?MODULE}, ?MODULE, [], []).

incr() -> gen_server:call(?MODULE, incr).
get() -> gen_server:call(?MODULE, get).

init([]) -> {ok, {state, 0}}.

handle_call(incr, _From, {state, N}) -> {reply, N + 1, {state, N + 1}};
handle_call(get, _From, {state, N} = S) -> {reply, N, S};
%% The version of the code the process runs (not of the caller's).
handle_call(version, _From, S) -> {reply, 1, S}.

handle_cast(_Msg, S) -> {noreply, S}.

code_change(_OldVsn, S, _Extra) -> {ok, S}.
