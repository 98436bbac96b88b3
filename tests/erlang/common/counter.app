{application, counter,
 [{description, "hotroll test fixture: a counter gen_server under a supervisor"},
  {vsn, "1"},
  {modules, [counter_app, counter_sup, counter_server, counter_fmt]},
  {registered, [counter_sup, counter_server]},
  {applications, [kernel, stdlib]},
  {mod, {counter_app, []}},
  {env, []}]}.
