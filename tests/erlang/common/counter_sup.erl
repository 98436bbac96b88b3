%% hotroll test fixture: the counter's supervisor (the release handler finds counter_server
%% through it).
-module(counter_sup).
-behaviour(supervisor).
-export([start_link/0, init/1]).

start_link() -> supervisor:start_link({local, ?MODULE}, ?MODULE, []).

init([]) ->
    Child = #{id => counter_server,
              start => {counter_server, start_link, []},
              restart => permanent,
              shutdown => 5000,
              type => worker,
              modules => [counter_server]},
    {ok, {#{strategy => one_for_one, intensity => 10, period => 10}, [Child]}}.
