#Requires -Version 5.1
<#
.SYNOPSIS
    Hot-adds network adapters to a running hvnet VM.

.DESCRIPTION
    Adds Count synthetic network adapters on a virtual switch to the VM, with
    Add-VMNetworkAdapter. Hyper-V adds and removes network adapters on a running VM only
    for Generation 2 VMs (Windows Server 2016 / Windows 10 hosts and later); a
    Generation 1 VM must be off, and the script refuses otherwise. At most 8 synthetic
    adapters fit in a VM.

    The appliance offers each new adapter's VMBus channel to its NIC probe, opens its
    queues and asks for an address by DHCP. With -WaitForIP the script waits until
    Hyper-V shows an IPv4 address on every new adapter: Hyper-V learns the addresses
    from the guest over KVP (the Key-Value Pair Exchange integration service), so this
    also checks that the appliance answers KVP.

.PARAMETER VMName
    The VM (as shown by Get-VM).

.PARAMETER SwitchName
    Existing virtual switch for the new adapters.

.PARAMETER Name
    Adapter name. With -Count 1, the name itself; with more, Name1, Name2, ... Default:
    the next free nicN names (nic0 is the one New-HvnetVM.ps1 made first).

.PARAMETER Count
    How many adapters to add, 1 to 8. Default 1.

.PARAMETER WaitForIP
    Wait until every new adapter shows an IPv4 address (through KVP).

.PARAMETER TimeoutSeconds
    How long -WaitForIP waits, 1 to 3600 seconds. Default 120.

.EXAMPLE
    .\Add-HvnetNic.ps1 -VMName hvnet1 -SwitchName 'Default Switch' -Count 2 -WaitForIP

.EXAMPLE
    .\Add-HvnetNic.ps1 -VMName hvnet1 -SwitchName LAN -Name backend -WhatIf

.OUTPUTS
    Microsoft.HyperV.PowerShell.VMNetworkAdapter for each adapter added.
#>
[CmdletBinding(SupportsShouldProcess)]
param(
    [Parameter(Mandatory)]
    [ValidateNotNullOrEmpty()]
    [string] $VMName,

    [Parameter(Mandatory)]
    [ValidateNotNullOrEmpty()]
    [string] $SwitchName,

    [ValidateLength(1, 100)]
    [ValidatePattern('^[A-Za-z0-9][A-Za-z0-9._-]*$')]
    [string] $Name,

    [ValidateRange(1, 8)]
    [int] $Count = 1,

    [switch] $WaitForIP,

    [ValidateRange(1, 3600)]
    [int] $TimeoutSeconds = 120
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
if ($vm.Generation -eq 1 -and $vm.State -ne 'Off') {
    throw ("'$VMName' is a Generation 1 VM in state $($vm.State): Hyper-V hot-adds network adapters only to " +
        'Generation 2 VMs. Stop it first (Stop-VM), or use a Generation 2 VM for hot-plug.')
}
if (-not (Get-VMSwitch -Name $SwitchName -ErrorAction SilentlyContinue)) {
    throw "There is no virtual switch named '$SwitchName'; Get-VMSwitch lists them."
}

$existing = @(Get-VMNetworkAdapter -VM $vm)
$synthetic = @($existing | Where-Object { -not $_.IsLegacy })
if ($synthetic.Count + $Count -gt 8) {
    throw "'$VMName' has $($synthetic.Count) synthetic adapters; $Count more would pass Hyper-V's limit of 8."
}
$taken = @($existing | ForEach-Object { $_.Name })

$names = @()
if ($Name) {
    if ($Count -eq 1) {
        $names = @($Name)
    }
    else {
        $names = @(1..$Count | ForEach-Object { "$Name$_" })
    }
}
else {
    $n = 0
    while ($names.Count -lt $Count) {
        if ($taken -notcontains "nic$n") { $names += "nic$n" }
        $n++
    }
}
foreach ($candidate in $names) {
    if ($taken -contains $candidate) {
        throw "'$VMName' already has an adapter named '$candidate'; pick another -Name."
    }
}

$added = @()
foreach ($adapterName in $names) {
    if ($PSCmdlet.ShouldProcess($VMName, "Add network adapter '$adapterName' on switch '$SwitchName'")) {
        $added += Add-VMNetworkAdapter -VM $vm -Name $adapterName -SwitchName $SwitchName -Passthru -Confirm:$false
        Write-Verbose "added '$adapterName' to '$VMName'"
    }
}

if ($WaitForIP -and $added.Count -gt 0) {
    $clock = [Diagnostics.Stopwatch]::StartNew()
    $pending = @($names)
    while ($pending.Count -gt 0 -and $clock.Elapsed.TotalSeconds -lt $TimeoutSeconds) {
        Start-Sleep -Milliseconds 500
        $current = @(Get-VMNetworkAdapter -VM $vm)
        $pending = @($pending | Where-Object {
                $adapterName = $_
                $addresses = @($current | Where-Object { $_.Name -eq $adapterName } |
                        ForEach-Object { $_.IPAddresses } | Where-Object { $_ -match '^\d{1,3}(\.\d{1,3}){3}$' })
                $addresses.Count -eq 0
            })
    }
    if ($pending.Count -gt 0) {
        Write-Warning ("No IPv4 address through KVP after $TimeoutSeconds s on: $($pending -join ', ') " +
            '(is KVP enabled, and does the appliance get a DHCP lease on that switch?)')
    }
    else {
        Write-Host ("All {0} new adapters show an IPv4 address after {1:N1} s." -f $names.Count, $clock.Elapsed.TotalSeconds)
    }
}

if ($added.Count -gt 0) {
    Get-VMNetworkAdapter -VM $vm | Where-Object { $names -contains $_.Name }
}
