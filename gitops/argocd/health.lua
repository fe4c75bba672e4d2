-- Argo CD health check for finetune.dev/FineTuneJob.
--
-- Install it in argocd-cm as `resource.customizations.health.finetune.dev_FineTuneJob` (see README.md). Argo CD runs
-- it with the live object as the global `obj` (gopher-lua, Lua 5.1) and expects {status = ..., message = ...}.
--
--   status.observedGeneration < metadata.generation -> Progressing (the operator has not seen the latest spec yet)
--   Pending, Queued, Running                          -> Progressing
--   Succeeded                                         -> Healthy
--   Failed                                            -> Degraded
--   Suspended                                         -> Suspended
--   no status yet                                     -> Progressing
--   any other phase                                   -> Unknown
-- The message is the phase's condition ("Reason: message"), plus step and percent while Running.

local hs = {}

local function find_condition(conditions, wanted)
  if conditions == nil then
    return nil
  end
  for _, c in ipairs(conditions) do
    if c.type == wanted and c.status == "True" then
      return c
    end
  end
  return nil
end

-- The newest True condition, for phases without a condition of their own (Pending reports "Created").
local function latest_condition(conditions)
  local latest = nil
  if conditions == nil then
    return nil
  end
  for _, c in ipairs(conditions) do
    if c.status == "True" and (latest == nil or (c.lastTransitionTime or "") >= (latest.lastTransitionTime or "")) then
      latest = c
    end
  end
  return latest
end

local function describe(c, fallback)
  if c == nil then
    return fallback
  end
  local reason = c.reason or ""
  local message = c.message or ""
  if reason ~= "" and message ~= "" then
    return reason .. ": " .. message
  end
  if message ~= "" then
    return message
  end
  if reason ~= "" then
    return reason
  end
  return fallback
end

local function progress_text(progress)
  if progress == nil then
    return ""
  end
  local parts = {}
  if progress.step ~= nil then
    if progress.totalSteps ~= nil then
      table.insert(parts, "step " .. tostring(progress.step) .. "/" .. tostring(progress.totalSteps))
    else
      table.insert(parts, "step " .. tostring(progress.step))
    end
  end
  if progress.percent ~= nil then
    table.insert(parts, tostring(math.floor(progress.percent + 0.5)) .. "%")
  end
  if progress.eta ~= nil and progress.eta ~= "" then
    table.insert(parts, "ETA " .. progress.eta)
  end
  if #parts == 0 then
    return ""
  end
  return " (" .. table.concat(parts, ", ") .. ")"
end

if obj.status == nil or obj.status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to pick up the FineTuneJob"
  return hs
end

local status = obj.status
local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  if status.observedGeneration ~= nil then
    hs.message = hs.message .. " (status is from generation " .. tostring(status.observedGeneration) .. ")"
  end
  return hs
end

local phase = status.phase
local conditions = status.conditions

if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = describe(find_condition(conditions, "Succeeded"), "Training succeeded")
elseif phase == "Failed" then
  hs.status = "Degraded"
  hs.message = describe(find_condition(conditions, "Failed"), "Training failed")
elseif phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = describe(find_condition(conditions, "Suspended"), "Suspended")
elseif phase == "Running" then
  hs.status = "Progressing"
  hs.message = describe(find_condition(conditions, "Running"), "Training") .. progress_text(status.progress)
elseif phase == "Queued" then
  hs.status = "Progressing"
  hs.message = describe(find_condition(conditions, "Queued"), "Waiting in the queue for quota")
elseif phase == "Pending" then
  hs.status = "Progressing"
  hs.message = describe(latest_condition(conditions), "Waiting for the trainer to start")
else
  hs.status = "Unknown"
  hs.message = "Unknown phase " .. tostring(phase)
end
return hs
