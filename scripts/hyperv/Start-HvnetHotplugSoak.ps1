#Requires -Version 5.1
<#
.SYNOPSIS
    Soaks a running hvnet VM with network adapter hot-add and hot-remove cycles.

.DESCRIPTION
    Repeats Cycles times: add NicCount adapters at once (Add-VMNetworkAdapter), wait
    until Hyper-V shows an IPv4 address on each of them (it learns them from the guest
    over KVP, so this proves the appliance probed the NIC, opened its queues, got a
    DHCP lease and answers KVP) or TimeoutSeconds pass, then remove them all
    (Remove-VMNetworkAdapter), and check that the VM still runs.

    Each cycle gives one result object: cycle number, whether it passed, seconds to add
    the adapters, seconds until the first and the last address showed, seconds to
    remove, the addresses, and what failed. A line per cycle and a summary are printed;
    -CsvPath also writes the results to a CSV file. The script exits with status 1 when
    any cycle failed.

    The VM must be a running Generation 2 VM (Hyper-V hot-plugs adapters only there), on
    a switch with a DHCP server. The soak's adapters are named Prefix1..PrefixN;
    leftovers with those names from an interrupted run are removed first.

.PARAMETER VMName
    The running Generation 2 VM.

.PARAMETER SwitchName
    Virtual switch for the soak adapters; needs DHCP for the addresses to come.

.PARAMETER NicCount
    Adapters added and removed per cycle, 1 to 7 (the VM keeps its own; 8 in all at most).
    Default 2.

.PARAMETER Cycles
    Number of add/remove cycles, 1 to 100000. Default 10.

.PARAMETER TimeoutSeconds
    How long a cycle waits for every address, 5 to 3600 seconds. Default 120.

.PARAMETER SettleSeconds
    Pause after removing, before the next cycle, 0 to 600 seconds. Default 2.

.PARAMETER Prefix
    Name prefix of the soak adapters. Default 'soak'.

.PARAMETER StopOnFailure
    Stop at the first failed cycle (its adapters are still removed).

.PARAMETER CsvPath
    Also write the per-cycle results to this CSV file.

.EXAMPLE
    .\Start-HvnetHotplugSoak.ps1 -VMName hvnet1 -SwitchName 'Default Switch' -NicCount 4 -Cycles 50

.EXAMPLE
    .\Start-HvnetHotplugSoak.ps1 -VMName hvnet1 -SwitchName LAN -Cycles 1000 -StopOnFailure -CsvPath .\soak.csv

.EXAMPLE
    .\Start-HvnetHotplugSoak.ps1 -VMName hvnet1 -SwitchName LAN -WhatIf

    Checks the VM and says what it would do; adds nothing.

.OUTPUTS
    PSCustomObject per cycle: Cycle, Passed, AddSeconds, FirstIPSeconds, LastIPSeconds,
    RemoveSeconds, Addresses, Failure.
#>
[CmdletBinding(SupportsShouldProcess)]
param(
    [Parameter(Mandatory)]
    [ValidateNotNullOrEmpty()]
    [string] $VMName,

    [Parameter(Mandatory)]
    [ValidateNotNullOrEmpty()]
    [string] $SwitchName,

    [ValidateRange(1, 7)]
    [int] $NicCount = 2,

    [ValidateRange(1, 100000)]
    [int] $Cycles = 10,

    [ValidateRange(5, 3600)]
    [int] $TimeoutSeconds = 120,

    [ValidateRange(0, 600)]
    [int] $SettleSeconds = 2,

    [ValidateLength(1, 50)]
    [ValidatePattern('^[A-Za-z][A-Za-z0-9_-]*$')]
    [string] $Prefix = 'soak',

    [switch] $StopOnFailure,

    [ValidateScript({
            $parent = Split-Path -Parent $_
            if ($parent -and -not (Test-Path -LiteralPath $parent -PathType Container)) {
                throw "directory not found: $parent"
            }
            $true
        })]
    [string] $CsvPath
)

Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'

if (-not (Get-Command -Name 'Add-VMNetworkAdapter' -ErrorAction SilentlyContinue)) {
    throw 'The Hyper-V PowerShell module is not available (enable Hyper-V with its management tools).'
}
$vm = Get-VM -Name $VMName -ErrorAction SilentlyContinue
if ($null -eq $vm) {
    throw "There is no VM named '$VMName' (Get-VM lists them)."
}
if (@($vm).Count -ne 1) {
    throw "More than one VM is named '$VMName'."
}
if ($vm.Generation -ne 2) {
    throw "'$VMName' is a Generation 1 VM: Hyper-V hot-plugs network adapters only on Generation 2 VMs."
}
if ($vm.State -ne 'Running') {
    throw "'$VMName' is $($vm.State); start it first (Start-VM) and let the appliance boot."
}
if (-not (Get-VMSwitch -Name $SwitchName -ErrorAction SilentlyContinue)) {
    throw "There is no virtual switch named '$SwitchName'; Get-VMSwitch lists them."
}
$kvp = @(Get-VMIntegrationService -VM $vm | Where-Object { $_.Name -eq 'Key-Value Pair Exchange' })
if ($kvp.Count -gt 0 -and -not $kvp[0].Enabled) {
    throw "KVP (Key-Value Pair Exchange) is off on '$VMName'; without it Hyper-V never shows the addresses. Enable-VMIntegrationService -VMName $VMName -Name 'Key-Value Pair Exchange'"
}

$names = @(1..$NicCount | ForEach-Object { "$Prefix$_" })
$all = @(Get-VMNetworkAdapter -VM $vm)
$leftovers = @($all | Where-Object { $names -contains $_.Name })
$others = @($all | Where-Object { ($names -notcontains $_.Name) -and -not $_.IsLegacy })
if ($others.Count + $NicCount -gt 8) {
    throw "'$VMName' has $($others.Count) other synthetic adapters; $NicCount more would pass Hyper-V's limit of 8."
}

$plan = "$Cycles cycles of adding $NicCount adapters ($($names -join ', ')) on '$SwitchName', " +
    "waiting up to $TimeoutSeconds s for their addresses, and removing them"
if (-not $PSCmdlet.ShouldProcess($VMName, $plan)) {
    return
}
if ($leftovers.Count -gt 0) {
    Write-Warning "Removing $($leftovers.Count) adapters left by an earlier soak: $(($leftovers | ForEach-Object { $_.Name }) -join ', ')"
    $leftovers | Remove-VMNetworkAdapter -Confirm:$false
}

$ipv4 = '^\d{1,3}(\.\d{1,3}){3}$'
$results = New-Object System.Collections.Generic.List[object]

for ($cycle = 1; $cycle -le $Cycles; $cycle++) {
    Write-Progress -Activity "Hot-plug soak of $VMName" -Status "cycle $cycle of $Cycles" `
        -PercentComplete ([int](100 * ($cycle - 1) / $Cycles))
    $failures = @()
    $addSeconds = $null
    $ipAt = @{}
    $addressOf = @{}
    $clock = [Diagnostics.Stopwatch]::StartNew()

    try {
        foreach ($adapterName in $names) {
            $null = Add-VMNetworkAdapter -VM $vm -Name $adapterName -SwitchName $SwitchName -Confirm:$false
        }
        $addSeconds = $clock.Elapsed.TotalSeconds
        while ($true) {
            $current = @(Get-VMNetworkAdapter -VM $vm)
            foreach ($adapterName in $names) {
                if ($ipAt.ContainsKey($adapterName)) { continue }
                $addresses = @($current | Where-Object { $_.Name -eq $adapterName } |
                        ForEach-Object { $_.IPAddresses } | Where-Object { $_ -match $ipv4 })
                if ($addresses.Count -gt 0) {
                    $ipAt[$adapterName] = $clock.Elapsed.TotalSeconds
                    $addressOf[$adapterName] = $addresses[0]
                }
            }
            if ($ipAt.Count -eq $names.Count) { break }
            if ($clock.Elapsed.TotalSeconds -ge $TimeoutSeconds) {
                $missing = @($names | Where-Object { -not $ipAt.ContainsKey($_) })
                $failures += "no IPv4 address within $TimeoutSeconds s on $($missing -join ', ')"
                break
            }
            Start-Sleep -Milliseconds 250
        }
    }
    catch {
        $failures += "add: $($_.Exception.Message)"
    }

    # Remove whatever was added, even after a failure.
    $removeClock = [Diagnostics.Stopwatch]::StartNew()
    try {
        $mine = @(Get-VMNetworkAdapter -VM $vm | Where-Object { $names -contains $_.Name })
        if ($mine.Count -gt 0) {
            $mine | Remove-VMNetworkAdapter -Confirm:$false
        }
    }
    catch {
        $failures += "remove: $($_.Exception.Message)"
    }
    $removeSeconds = $removeClock.Elapsed.TotalSeconds

    $state = (Get-VM -Name $VMName).State
    if ($state -ne 'Running') {
        $failures += "VM is $state after the cycle"
    }

    $firstIp = $null
    $lastIp = $null
    if ($ipAt.Count -gt 0) {
        $times = @($ipAt.Values | Sort-Object)
        $firstIp = [math]::Round($times[0], 2)
        $lastIp = [math]::Round($times[-1], 2)
    }
    $result = [pscustomobject]@{
        Cycle          = $cycle
        Passed         = ($failures.Count -eq 0)
        AddSeconds     = $(if ($null -ne $addSeconds) { [math]::Round($addSeconds, 2) } else { $null })
        FirstIPSeconds = $firstIp
        LastIPSeconds  = $(if ($ipAt.Count -eq $names.Count) { $lastIp } else { $null })
        RemoveSeconds  = [math]::Round($removeSeconds, 2)
        Addresses      = (@($names | Where-Object { $addressOf.ContainsKey($_) } |
                    ForEach-Object { "$_=$($addressOf[$_])" }) -join ' ')
        Failure        = ($failures -join '; ')
    }
    $results.Add($result)
    $result

    $line = '{0,5}/{1}  {2}  add {3,6:N2} s  addresses {4,7} s  remove {5,6:N2} s  {6}' -f $cycle, $Cycles,
        $(if ($result.Passed) { 'ok  ' } else { 'FAIL' }), $(if ($null -ne $addSeconds) { $addSeconds } else { 0 }),
        $(if ($null -ne $result.LastIPSeconds) { '{0:N2}' -f $result.LastIPSeconds } else { '-' }),
        $removeSeconds, $(if ($result.Passed) { $result.Addresses } else { $result.Failure })
    Write-Host $line

    if (-not $result.Passed -and $StopOnFailure) {
        Write-Warning "Stopping after the failed cycle $cycle (-StopOnFailure)."
        break
    }
    if ($state -ne 'Running') {
        Write-Warning "Stopping: the VM is no longer running."
        break
    }
    if ($SettleSeconds -gt 0 -and $cycle -lt $Cycles) {
        Start-Sleep -Seconds $SettleSeconds
    }
}
Write-Progress -Activity "Hot-plug soak of $VMName" -Completed

$passedCycles = @($results | Where-Object { $_.Passed })
$failedCycles = @($results | Where-Object { -not $_.Passed })
$times = @($passedCycles | ForEach-Object { $_.LastIPSeconds } | Where-Object { $null -ne $_ })
if ($times.Count -gt 0) {
    $stats = $times | Measure-Object -Minimum -Maximum -Average
    Write-Host ('All addresses within: min {0:N2} s, mean {1:N2} s, max {2:N2} s' -f $stats.Minimum, $stats.Average, $stats.Maximum)
}
Write-Host ('{0} cycles passed, {1} failed ({2} adapters per cycle on {3}).' -f $passedCycles.Count, $failedCycles.Count, $NicCount, $VMName)

if ($CsvPath) {
    $results | Export-Csv -LiteralPath $CsvPath -NoTypeInformation
    Write-Host "Results written to $CsvPath"
}
if ($failedCycles.Count -gt 0) {
    exit 1
}
