-- Argo CD health of an LMIModel (serving.lmi.dev), from the conditions the operator writes.
-- Healthy: Ready is True for the current generation. Degraded: the operator reports a problem
-- (Stalled or Degraded True: InsufficientGPU, CrashLoop, ImagePullFailed, OOMKilled, MissingSecret,
-- StartupTimeout, InvalidSpec). Progressing: anything else (rolling out, loading, not yet observed).
local hs = {}
local function find(conditions, ctype)
  if conditions == nil then
    return nil
  end
  for _, c in ipairs(conditions) do
    if c.type == ctype then
      return c
    end
  end
  return nil
end
local function describe(c)
  if c.reason ~= nil and c.message ~= nil and c.message ~= "" then
    return c.reason .. ": " .. c.message
  end
  return c.reason or c.message or ""
end

local generation = obj.metadata.generation
local status = obj.status
if status == nil or status.conditions == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to report status"
  return hs
end
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local ready = find(status.conditions, "Ready")
local stalled = find(status.conditions, "Stalled")
local degraded = find(status.conditions, "Degraded")
local progressing = find(status.conditions, "Progressing")
local current = ready ~= nil and (ready.observedGeneration == nil or generation == nil
  or ready.observedGeneration >= generation)

if current and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = describe(ready)
  if degraded ~= nil and degraded.status == "True" then
    hs.message = hs.message .. "; but " .. describe(degraded)
  end
  return hs
end
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(stalled)
  return hs
end
if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(degraded)
  return hs
end
hs.status = "Progressing"
if progressing ~= nil and progressing.status == "True" then
  hs.message = describe(progressing)
elseif ready ~= nil then
  hs.message = describe(ready)
else
  hs.message = "Waiting for the Ready condition"
end
return hs
