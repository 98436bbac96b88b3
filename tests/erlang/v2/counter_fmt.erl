%% hotroll test fixture, added in version 2: formatting used by counter_server (so a plan must
%% load it before counter_server).
-module(counter_fmt).
-export([describe/2]).

describe(Count, Note) ->
    lists:flatten(io_lib:format("~b (~p)", [Count, Note])).
