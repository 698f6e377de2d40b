-- Argo CD health check for nixos.infra/NixosConfiguration (gopher-lua, Lua 5.1). Reads the conditions NIO
-- writes (docs/gitops.md): Stalled -> Degraded, Ready -> Healthy, a paused or suspended rollout, or a wave
-- awaiting approval -> Suspended,
-- Git or a Secret unavailable (Degraded, retried by NIO) -> Degraded, anything else underway -> Progressing.
local hs = { status = "Progressing", message = "Waiting for the NIO controller" }
local function find(conditions, kind)
  if conditions == nil then return nil end
  for _, c in ipairs(conditions) do
    if c.type == kind then return c end
  end
  return nil
end
local function is_true(c) return c ~= nil and c.status == "True" end

if obj.status == nil or obj.status.observedGeneration == nil then
  return hs
end
if obj.metadata.generation ~= nil and obj.status.observedGeneration ~= obj.metadata.generation then
  hs.message = "Waiting for the NIO controller to observe generation " .. tostring(obj.metadata.generation)
  return hs
end
local conditions = obj.status.conditions
local ready = find(conditions, "Ready")
local stalled = find(conditions, "Stalled")
local reconciling = find(conditions, "Reconciling")
local degraded = find(conditions, "Degraded")
local progressing = find(conditions, "Progressing")

if is_true(stalled) then
  hs.status = "Degraded"
  hs.message = stalled.message or stalled.reason
elseif is_true(ready) then
  hs.status = "Healthy"
  hs.message = ready.message or ""
elseif is_true(degraded) and degraded.reason ~= "MachinesFailed" and degraded.reason ~= "InvalidMachines" then
  hs.status = "Degraded"
  hs.message = degraded.reason .. ": " .. (degraded.message or "")
elseif progressing ~= nil and (progressing.reason == "Paused" or progressing.reason == "Suspended") then
  hs.status = "Suspended"
  hs.message = "Rollout " .. string.lower(progressing.reason) .. " at " .. (obj.status.progress or "?") .. " machines"
elseif progressing ~= nil and progressing.reason == "AwaitingApproval" then
  hs.status = "Suspended"
  hs.message = "Wave " .. (obj.status.currentWave or "?") .. " awaits approval"
  for _, w in ipairs(obj.status.waves or {}) do
    if w.name == obj.status.currentWave and w.message ~= nil then hs.message = w.message end
  end
elseif is_true(reconciling) then
  hs.message = reconciling.message or reconciling.reason
end
return hs
